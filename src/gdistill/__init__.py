"""gdistill: semi-supervised instance segmentation by Guided Distillation."""

from gdistill.errors import GdistillError

__version__ = "0.1.0"

__all__ = ["GdistillError", "__version__", "load_model"]


def __getattr__(name: str):
    # `load_model` imports torch and the model; keep `import gdistill` itself light.
    if name == "load_model":
        from gdistill.inference import load_model

        return load_model
    raise AttributeError(f"module 'gdistill' has no attribute {name!r}")
