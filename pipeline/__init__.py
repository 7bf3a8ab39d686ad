"""A reproducible, distributed training pipeline for Fashion-MNIST (DVC + Hugging Face Accelerate)."""

import sys

from pipeline.errors import quiet_interrupt_while_starting

quiet_interrupt_while_starting(sys.argv)  # a stage's module imports torch before its main can catch Ctrl-C
