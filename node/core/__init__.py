"""Settings, UIDs, DICOM constants and the queue configuration: what node/ and workers/ share."""
