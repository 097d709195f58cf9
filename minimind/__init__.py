"""A teaching-first book that rebuilds a small ChatGPT-style language model from zero"""

__version__ = "0.1.0"
