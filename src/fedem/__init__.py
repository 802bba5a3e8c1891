"""fedem: train Seshu, a small multilingual Mamba language model, together."""

__version__ = "0.1.0"
