"""HiMix networks and blocks, in MONAI's layout (``networks/nets`` and ``networks/blocks``)."""

from .blocks import DynamicLayerFusion, layer_groups
from .nets import CXR_BERT, HiMix

__all__ = ["CXR_BERT", "DynamicLayerFusion", "HiMix", "layer_groups"]
