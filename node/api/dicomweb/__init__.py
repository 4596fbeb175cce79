"""DICOMweb on the node (PS3.18): STOW-RS in, QIDO-RS and WADO-RS out."""
