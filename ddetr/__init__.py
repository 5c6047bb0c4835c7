"""ddetr: Deformable DETR (arXiv 2010.04159) trained at cluster scale on Ray."""

__version__ = "0.1.0"
