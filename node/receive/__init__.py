"""Receiving: the DICOM listener, durable storage of instances and their rows."""
