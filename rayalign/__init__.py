"""rayalign: Ray-distributed multilingual self-alignment of large language models."""

__version__ = "0.1.0"
