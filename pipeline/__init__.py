"""A reproducible, distributed training pipeline for Fashion-MNIST (DVC + Hugging Face Accelerate)."""

__version__ = "0.1.0"
