"""catsdogs: CPU-first image classification from a folder of labelled photos."""

__version__ = "0.1.0"
