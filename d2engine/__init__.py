"""d2engine: a standalone, model-agnostic PyTorch training engine with detectron2's engine API."""

__version__ = "0.1.0"

__all__ = ["__version__"]
