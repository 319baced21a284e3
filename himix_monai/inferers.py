"""
Inferers for the HiMix bundle.

- :py:class:`AutocastInferer` runs the network under ``torch.autocast`` (bf16 / fp16) on whatever device the
  input is on and returns float32, so trainer, evaluator and inference share one mixed-precision switch
  (MONAI's ``amp=True`` autocasts on CUDA only).
- :py:class:`TextPromptInferer` supplies a text prompt (per request from the image's metadata, or fixed) to a
  text-guided network that is called with the image only, as MONAI Label does
  (``inferer(data["image"][None], network)``).
- :py:class:`TextSliceInferer` runs the 2-D network over a volume slice by slice (MONAI's ``SliceInferer``),
  with the volume's text given to every slice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from monai.inferers import Inferer, SimpleInferer, SliceInferer

from himix_monai.precision import as_dtype
from himix_monai.transforms.text import PROMPT_META_KEY, TokenizeTextd

__all__ = ["AutocastInferer", "TextPromptInferer", "TextSliceInferer", "compute_dtype", "has_native_bf16"]

logger = logging.getLogger(__name__)

def compute_dtype(precision: str, device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype the bundle's ``precision`` switch computes in on ``device``.

    ``"fp32"`` gives float32, ``"bf16"`` bfloat16 and ``"fp16"`` float16, except on a CPU, where float16 falls
    back to bfloat16 (as :py:class:`AutocastInferer` does), on a GPU without native bfloat16 (compute
    capability below 8.0), where bfloat16 falls back to float16, and on a device type without autocast
    (float32). The bundle's training turns MONAI's loss scaler (``amp``) on exactly when this gives float16,
    so every accepted spelling of fp16 trains with a ``GradScaler``.
    Use it to store weights that are never trained (the frozen text encoder; the whole network for
    inference) in the precision they are computed in: half the memory and no casts on every call.

    Examples::

        >>> compute_dtype("fp16", "cpu"), compute_dtype("fp32", "cuda")
        (torch.bfloat16, torch.float32)
    """
    dtype = as_dtype(precision)
    device = torch.device(device)
    if dtype == torch.float32 or not torch.amp.is_autocast_available(device.type):
        return torch.float32
    if device.type == "cpu" and dtype == torch.float16:
        return torch.bfloat16
    if device.type == "cuda" and dtype == torch.bfloat16 and not has_native_bf16(device):
        return torch.float16
    return dtype


def has_native_bf16(device: str | torch.device) -> bool:
    """Whether a CUDA ``device`` computes bfloat16 natively (compute capability 8.0, Ampere, or newer).

    ``torch.autocast`` accepts bf16 on older GPUs (V100, T4) through emulation, which is slow and lacks some
    cuDNN kernels; :py:func:`compute_dtype` therefore gives float16 there (trained with a loss scaler).
    Non-CUDA devices report True: the question does not arise for them.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _to_float32(output: Any) -> Any:
    """Cast floating tensors in (nested) network outputs to float32."""
    if isinstance(output, torch.Tensor):
        return output.float() if output.is_floating_point() else output
    if isinstance(output, Mapping):
        return type(output)({k: _to_float32(v) for k, v in output.items()})  # type: ignore[call-arg]
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # namedtuple
        return type(output)(*(_to_float32(v) for v in output))
    if isinstance(output, (list, tuple)):
        return type(output)(_to_float32(v) for v in output)
    return output


class AutocastInferer(SimpleInferer):
    """
    ``SimpleInferer`` that runs the network under ``torch.autocast`` and returns float32 outputs.

    The autocast device type is taken from the input tensor at call time (``"cpu"``, ``"cuda"``, ...), so one
    config serves CPU and GPU runs. Outputs are cast back to float32 so that losses and metrics are computed
    in full precision. Extra positional and keyword arguments (e.g. ``input_ids`` and ``attention_mask``
    from ``PrepareBatchExtraInput``) are passed on to the network.

    ``precision="fp16"`` on CPU falls back to bf16 (logged once per inferer): CPU float16 autocast is
    emulated by many kernels and much slower than bf16. On a device type without autocast support the
    network runs in float32 (logged once).

    Args:
        precision: ``"fp32"`` (no autocast), ``"bf16"`` or ``"fp16"``; ``"float32"``, ``"bfloat16"`` and
            ``"float16"`` are accepted too.

    Examples::

        from monai.engines import SupervisedEvaluator
        from monai.engines.utils import PrepareBatchExtraInput
        from himix_monai.inferers import AutocastInferer

        evaluator = SupervisedEvaluator(
            device=device, val_data_loader=loader, network=net,
            prepare_batch=PrepareBatchExtraInput(extra_keys=["input_ids", "attention_mask"]),
            inferer=AutocastInferer(precision="bf16"),
        )

    """

    def __init__(self, precision: str = "fp32") -> None:
        super().__init__()
        dtype = as_dtype(precision)
        self.precision = str(precision).lower()
        self.dtype: torch.dtype | None = None if dtype == torch.float32 else dtype  # None: no autocast
        self._reported: set[str] = set()

    def _report_once(self, message: str) -> None:
        if message not in self._reported:
            self._reported.add(message)
            logger.warning(message)

    def autocast_dtype(self, device_type: str) -> torch.dtype | None:
        """The autocast dtype used on ``device_type``, or None for float32 (no autocast)."""
        if self.dtype is None:
            return None
        dtype = compute_dtype(self.precision, device_type)
        if dtype == torch.float32:
            self._report_once(f"autocast is not available on device type {device_type!r}; running in float32.")
            return None
        if dtype != self.dtype and dtype == torch.bfloat16:
            self._report_once("precision 'fp16' on CPU falls back to bf16 autocast (CPU float16 is slow).")
        elif dtype != self.dtype:
            self._report_once(
                f"precision {self.precision!r}: this {device_type} device has no native bfloat16; "
                "running in float16 (training uses a loss scaler)."
            )
        return dtype

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        """
        Args:
            inputs: model input, e.g. the image batch ``(B, C, H, W)``.
            network: the model (or any callable).
            args: extra positional arguments for ``network``, e.g. ``input_ids, attention_mask``.
            kwargs: extra keyword arguments for ``network``.

        Returns:
            the network output with floating tensors in float32.
        """
        dtype = self.autocast_dtype(inputs.device.type)
        if dtype is None:
            return _to_float32(network(inputs, *args, **kwargs))
        with torch.autocast(device_type=inputs.device.type, dtype=dtype):
            output = network(inputs, *args, **kwargs)
        return _to_float32(output)


class TextPromptInferer(AutocastInferer):
    """
    Inferer that gives a text-guided network its text prompt when it is called with the image only.

    MONAI Label calls ``inferer(data["image"][None], network)`` without text. The prompt comes from one of two
    places, the first that has one:

    1. the image's metadata: a ``MetaTensor`` input whose ``meta["text_prompt"]`` holds a string (put there per
       request by :py:class:`~himix_monai.transforms.text.TextPromptToMetad` from the client's raw value), or a
       sequence of strings, one per batch item (a collated batch);
    2. ``text_prompt``, fixed when the inferer is built (the bundle's ``--text_prompt`` setting).

    The prompt is tokenised (with the tokenizer loading of :py:class:`~himix_monai.transforms.text.TokenizeTextd`)
    and the network is called as ``network(image, input_ids, attention_mask)`` with the tokens on the image's
    device. Without a prompt the network is called without text (and any extra arguments of the caller are
    passed on, as by :py:class:`AutocastInferer`). A prompt is data: it is never given to a config parser.

    A caller that supplies its own text arguments while a prompt is set is an error (ambiguous which text is
    meant): use :py:class:`AutocastInferer` to pass the batch's text.

    Args:
        text_prompt: the fixed prompt, e.g. ``"Bilateral pulmonary infection, two infected areas."``; empty or
            None for none (a prompt in the image's metadata is still used).
        tokenizer: hub name, local directory or tokenizer instance; required for any prompt.
        max_length: token length, as used in training (default 24).
        precision: autocast precision, see :py:class:`AutocastInferer`.

    Examples::

        from himix_monai.inferers import TextPromptInferer

        inferer = TextPromptInferer(
            text_prompt="Unilateral pulmonary infection, one infected area, lower left lung.",
            tokenizer="/models/BiomedVLP-CXR-BERT-specialized",
        )
        logits = inferer(image[None], network)  # network(image, input_ids, attention_mask)

    """

    def __init__(
        self,
        text_prompt: str | None = None,
        tokenizer: Any = None,
        max_length: int = 24,
        precision: str = "fp32",
    ) -> None:
        super().__init__(precision=precision)
        if text_prompt is not None and not isinstance(text_prompt, str):
            raise TypeError(f"text_prompt must be a string or None, got {type(text_prompt).__name__}.")
        self.text_prompt = text_prompt if text_prompt and text_prompt.strip() else None
        if self.text_prompt is not None and tokenizer is None:
            raise ValueError("TextPromptInferer needs a tokenizer when text_prompt is set.")
        self._tokenize = (
            None if tokenizer is None else TokenizeTextd(keys="text", tokenizer=tokenizer, max_length=max_length)
        )
        self._tokens: tuple[torch.Tensor, torch.Tensor] | None = None

    def prompt_tokens(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(input_ids, attention_mask)`` of the fixed prompt, each ``(1, max_length)`` on CPU; None without one."""
        if self._tokenize is None or self.text_prompt is None:
            return None
        if self._tokens is None:
            input_ids, attention_mask = self._tokenize.tokenize(self.text_prompt, source="text_prompt")
            self._tokens = (input_ids[None], attention_mask[None])
        return self._tokens

    def _metadata_prompts(self, inputs: torch.Tensor) -> list[str] | None:
        """The per-item prompts of ``inputs``' metadata (one per batch item), or None when it has none."""
        meta = getattr(inputs, "meta", None)
        prompts = meta.get(PROMPT_META_KEY) if isinstance(meta, Mapping) else None
        if prompts is None:
            return None
        batch = int(inputs.shape[0])
        prompts = [prompts] * batch if isinstance(prompts, str) else list(prompts)
        if len(prompts) != batch or not all(isinstance(p, str) for p in prompts):
            raise TypeError(
                f"the image metadata's {PROMPT_META_KEY!r} must be a string or one string per batch item "
                f"({batch}), got {prompts!r:.120}."
            )
        if not any(p.strip() for p in prompts):
            return None
        if not all(p.strip() for p in prompts):
            raise ValueError(
                f"a batch mixes images with and without a {PROMPT_META_KEY!r}: give every image of a batch a "
                "report, or none (batch size 1 allows both)."
            )
        return prompts

    def tokens_for(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(input_ids, attention_mask)`` of shape ``(B, max_length)`` on ``inputs``' device, or None for no text.

        Args:
            inputs: the image batch; a ``MetaTensor`` may carry per-request prompts in its metadata.
        """
        prompts = self._metadata_prompts(inputs)
        if prompts is None:
            tokens = self.prompt_tokens()
            if tokens is None:
                return None
            return tuple(t.to(inputs.device).expand(inputs.shape[0], -1) for t in tokens)  # type: ignore[return-value]
        if self._tokenize is None:
            raise ValueError("TextPromptInferer needs a tokenizer to read the prompt in the image's metadata.")
        pairs = [self._tokenize.tokenize(p, source=PROMPT_META_KEY) for p in prompts]
        input_ids = torch.stack([ids for ids, _ in pairs]).to(inputs.device)
        attention_mask = torch.stack([mask for _, mask in pairs]).to(inputs.device)
        return input_ids, attention_mask

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        """
        Args:
            inputs: image batch ``(B, C, H, W)``.
            network: the text-guided model, called as ``network(inputs, input_ids, attention_mask)``.
            args: must be empty when a prompt is set.
            kwargs: must be empty when a prompt is set.

        Returns:
            the network output with floating tensors in float32.
        """
        tokens = self.tokens_for(inputs)
        if tokens is None:
            return super().__call__(inputs, network, *args, **kwargs)
        if args or kwargs:
            raise ValueError(
                "TextPromptInferer has a text prompt but the caller also passed text arguments; "
                "use AutocastInferer to pass the batch's text, or clear text_prompt."
            )
        return super().__call__(inputs, network, *tokens)


class TextSliceInferer(Inferer):
    """
    MONAI's ``SliceInferer`` for a 2-D text-guided network over a volume: every slice gets the volume's text.

    Why a wrapper: ``SliceInferer`` (MONAI 1.6) calls the network with the image windows only (the extra
    arguments of its ``__call__`` are not passed on), and a window batch holds up to ``sw_batch_size`` slices
    while the volume's ``input_ids``/``attention_mask`` have batch size 1. This inferer gives ``SliceInferer`` a
    function that repeats such arguments to the window batch and calls the 2-D ``inferer`` (autocast, fixed text
    prompt: :py:class:`AutocastInferer`, :py:class:`TextPromptInferer`) on each window batch.

    Args:
        roi_size: the network's 2-D input size (the volume is resized in-plane to it beforehand, so one window
            covers a whole slice).
        sw_batch_size: slices per network call.
        inferer: the 2-D inferer called per window batch; an fp32 :py:class:`AutocastInferer` by default.
        spatial_dim: the slice axis among the 3 spatial axes (2: last, after
            :py:class:`~himix_monai.transforms.SliceAxisLastd`).
        kwargs: more ``SliceInferer`` arguments (``device``, ``sw_device``, ...).

    Examples::

        inferer = TextSliceInferer(roi_size=(256, 256), sw_batch_size=16, inferer=TextPromptInferer(None))
        logits = inferer(volume[None], network, input_ids, attention_mask)  # (1, C, H, W, D); tokens (1, L)
    """

    def __init__(
        self,
        roi_size: Sequence[int],
        sw_batch_size: int = 16,
        inferer: Callable[..., Any] | None = None,
        spatial_dim: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.slicer = SliceInferer(
            spatial_dim=spatial_dim,
            roi_size=tuple(int(s) for s in roi_size),
            sw_batch_size=int(sw_batch_size),
            **kwargs,
        )
        self.inferer = inferer if inferer is not None else AutocastInferer()

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """
        Args:
            inputs: one volume ``(1, C, H, W, D)``.
            network: the 2-D model.
            args: per-volume arguments of the network (tensors of batch size 1, e.g. ``input_ids, attention_mask``).
            kwargs: keyword arguments of the network.

        Raises:
            ValueError: when a batch holds several volumes and text arguments (one text per window batch is
                required).
        """
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if any(t.shape[0] != 1 for t in tensors) or (tensors and inputs.shape[0] != 1):
            raise ValueError(
                "TextSliceInferer: one volume per batch with its text (batch size 1), "
                f"got a batch of {inputs.shape[0]} "
                "volumes; set the volume data loader's batch_size to 1"
            )

        def repeat(value: Any, size: int) -> Any:
            return value.expand(size, *value.shape[1:]) if isinstance(value, torch.Tensor) else value

        def on_window(window: torch.Tensor) -> Any:
            size = window.shape[0]
            extra = {k: repeat(v, size) for k, v in kwargs.items()}
            return self.inferer(window, network, *(repeat(a, size) for a in args), **extra)

        return self.slicer(inputs, on_window)
