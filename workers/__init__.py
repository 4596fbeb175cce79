"""Celery app and tasks: build the volume, run a segmenter, write DICOM outputs, dispatch them."""
