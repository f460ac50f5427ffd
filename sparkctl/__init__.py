"""sparkctl: turn two or more NVIDIA DGX Sparks into one inference cluster."""

__version__ = "0.1.0"
