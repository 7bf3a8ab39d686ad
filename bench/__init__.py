"""Benchmarks of the pipeline against the seed loop: ``fashion-benchmark``, ``python -m bench.benchmark``."""

import pipeline  # noqa: F401  (its import sets up the one-line Ctrl-C while a script's own imports run)
