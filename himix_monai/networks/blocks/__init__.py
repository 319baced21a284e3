"""Building blocks of HiMix."""

from .asrm import AdaptiveSpectrumRefinement, gaussian_spectrum_filter
from .dlfm import LAYER_GROUPINGS, DynamicLayerFusion, interleaved_layer_groups, layer_groups
from .image_encoder import TimmImageEncoder
from .mixing_stage import TextProjection, VisualTextualMixingStage, sinusoidal_position_embedding_2d
from .text_encoder import FrozenTextEncoder, is_cxr_bert_config, load_text_encoder, load_text_tokenizer

__all__ = [
    "AdaptiveSpectrumRefinement",
    "DynamicLayerFusion",
    "FrozenTextEncoder",
    "LAYER_GROUPINGS",
    "TextProjection",
    "TimmImageEncoder",
    "VisualTextualMixingStage",
    "gaussian_spectrum_filter",
    "interleaved_layer_groups",
    "is_cxr_bert_config",
    "layer_groups",
    "load_text_encoder",
    "load_text_tokenizer",
    "sinusoidal_position_embedding_2d",
]
