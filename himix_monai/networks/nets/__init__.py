"""HiMix networks."""

from .himix import CXR_BERT, HiMix

__all__ = ["CXR_BERT", "HiMix"]
