"""dfpipe: a reproducible image deepfake detection pipeline (multi-FFDI winning recipe)."""

__version__ = "0.1.0"
