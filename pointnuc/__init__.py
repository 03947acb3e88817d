"""pointnuc: nuclei segmentation for QuPath from a few clicked points."""

__version__ = "0.1.0"
