"""Building blocks of HiMix."""

from .asrm import AdaptiveSpectrumRefinement, gaussian_spectrum_filter, gaussian_spectrum_operator
from .dlfm import (
    LAYER_GROUPINGS,
    DynamicLayerFusion,
    cluster_layer_groups,
    interleaved_layer_groups,
    layer_groups,
    layer_proxy_statistics,
)
from .head import subpixel_segmentation_head
from .image_encoder import CPUDepthwiseConv2d, TimmImageEncoder, use_cpu_depthwise_convs
from .mixing_stage import (
    POSITION_ENCODINGS,
    TEXT_PROJECTION_ORDERS,
    TextProjection,
    VisualTextualMixingStage,
    sinusoidal_position_embedding_1d,
    sinusoidal_position_embedding_2d,
)
from .text_encoder import (
    FrozenTextEncoder,
    ScriptableTextEncoder,
    TextEncoderMismatchError,
    is_cxr_bert_config,
    load_text_encoder,
    load_text_tokenizer,
    text_encoder_fingerprint,
)

__all__ = [
    "AdaptiveSpectrumRefinement",
    "CPUDepthwiseConv2d",
    "DynamicLayerFusion",
    "FrozenTextEncoder",
    "LAYER_GROUPINGS",
    "POSITION_ENCODINGS",
    "cluster_layer_groups",
    "layer_proxy_statistics",
    "ScriptableTextEncoder",
    "TextEncoderMismatchError",
    "TEXT_PROJECTION_ORDERS",
    "TextProjection",
    "TimmImageEncoder",
    "VisualTextualMixingStage",
    "gaussian_spectrum_filter",
    "gaussian_spectrum_operator",
    "interleaved_layer_groups",
    "is_cxr_bert_config",
    "layer_groups",
    "load_text_encoder",
    "load_text_tokenizer",
    "sinusoidal_position_embedding_1d",
    "sinusoidal_position_embedding_2d",
    "subpixel_segmentation_head",
    "text_encoder_fingerprint",
    "use_cpu_depthwise_convs",
]
