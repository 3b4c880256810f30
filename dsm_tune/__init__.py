"""dsm-tune: auto-tuner for Delayed Spatial Merging on timm Vision Transformers."""

__version__ = "0.1.0"
