"""Input and output: DICOM and image readers, atomic writers."""
