"""distalign: distributional preference alignment for language models."""

__version__ = "0.1.0"
