"""Turning a CT volume into labelled structures.

This package knows nothing of DICOM networking, Celery or the database: a segmenter takes a
:class:`~segmenters.base.Volume` of Hounsfield units and returns a label map of the same shape.
"""
