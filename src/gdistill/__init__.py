"""gdistill: semi-supervised instance segmentation by Guided Distillation."""

from gdistill.errors import GdistillError

__version__ = "0.1.0"

__all__ = ["GdistillError", "__version__"]
