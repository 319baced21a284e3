"""Shared fixtures: tiny text encoders and tokenizers made on the spot (no hub, no ../shared)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [
    "bilateral", "unilateral", "pulmonary", "infection", ",", ".", "one", "two", "three", "infected", "area",
    "areas", "upper", "middle", "lower", "left", "right", "lung", "all", "and", "polyp", "small", "large",
    "located", "in", "of", "the", "image", "##s",
]  # fmt: skip


def tiny_bert_config(num_layers: int = 6, hidden: int = 32):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(TINY_VOCAB),
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
    )


@pytest.fixture
def tiny_bert():
    """A randomly initialised 6-layer, 32-wide BERT."""
    from transformers import BertModel

    torch.manual_seed(0)
    return BertModel(tiny_bert_config())


@pytest.fixture
def tiny_text_model_dir(tmp_path):
    """A local model directory (config, weights, vocab) of a tiny BERT, loadable by name like a hub model."""
    from transformers import BertModel, BertTokenizerFast

    torch.manual_seed(0)
    directory = tmp_path / "tiny_bert"
    BertModel(tiny_bert_config()).save_pretrained(directory)
    (directory / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
    BertTokenizerFast.from_pretrained(directory, do_lower_case=True).save_pretrained(directory)
    return str(directory)
