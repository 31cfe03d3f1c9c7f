"""picstream: streaming Parametric Instance Classification pre-training on corpora of any size."""

__version__ = "0.1.0"
