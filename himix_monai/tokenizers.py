"""
Tokenizers of the text encoders, and the little the tokenizer and the encoder loaders share.

A bottom-level module: the text transforms (:py:mod:`himix_monai.transforms.text`) load tokenizers from here
without importing the network; :py:mod:`himix_monai.networks.blocks.text_encoder` loads the encoders with the
same configuration readers.
"""

from __future__ import annotations

import json
import os

from transformers import AutoTokenizer, BertTokenizerFast
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import cached_file

__all__ = ["read_model_json", "is_cxr_bert_config", "load_text_tokenizer"]

_CXR_BERT_MODEL_TYPES = ("cxr-bert", "cxrbert")


def read_model_json(source: str | os.PathLike, filename: str) -> dict:
    """Read the JSON file ``filename`` of a local model directory or a hub repository (from the cache when offline).

    Args:
        source: a local model directory or a hub name.
        filename: e.g. ``"config.json"``.

    Returns:
        its content, or ``{}`` when the file is absent.
    """
    path = os.path.join(source, filename)
    if not os.path.isdir(source):
        path = cached_file(os.fspath(source), filename, _raise_exceptions_for_missing_entries=False)
    if path is None or not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def is_cxr_bert_config(config: dict) -> bool:
    """Whether a ``config.json`` describes CXR-BERT (which needs remote code to load through the Auto classes)."""
    architectures = config.get("architectures") or []
    return config.get("model_type") in _CXR_BERT_MODEL_TYPES or any("CXRBert" in a for a in architectures)


def load_text_tokenizer(source: str | os.PathLike | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Load the tokenizer that belongs to a text encoder (hub name, local directory, or instance).

    CXR-BERT's ``CXRBertTokenizer`` is a plain lower-case BERT WordPiece tokenizer and is loaded as
    ``BertTokenizerFast`` from its ``vocab.txt``.
    """
    if isinstance(source, PreTrainedTokenizerBase):
        return source
    tokenizer_config = read_model_json(source, "tokenizer_config.json")
    if tokenizer_config.get("tokenizer_class") == "CXRBertTokenizer" or is_cxr_bert_config(
        read_model_json(source, "config.json")
    ):
        return BertTokenizerFast.from_pretrained(source, do_lower_case=True)
    return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
