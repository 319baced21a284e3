#!/usr/bin/env python
"""
Speed and memory benchmarks of HiMix-MONAI on the CPU.

Runs every benchmark case in a fresh Python process (this script, called again with ``--case NAME --precision
P``) so that the peak resident memory (``getrusage(RUSAGE_SELF).ru_maxrss``) belongs to that case alone, prints
one JSON line per result, then a readable table. Cases:

- ``train_step``: one optimisation step, batch 8, 224x224 RGB, ConvNeXt-Tiny + a randomly initialised 12-layer,
  768-wide BERT (CXR-BERT's size), AdamW, ``DiceCELoss``; split into text encoder / rest of the forward (with
  the loss) / backward / optimizer, with the bundle's defaults; ``train_step_checkpointed`` adds
  ``--gradient_checkpointing true``, ``train_step_low_memory`` also ``--low_memory_allocator true``
  (``himix_monai.memory.configure_allocator``);
- ``infer_b1``: inference latency at batch 1 (contiguous and channels-last, the faster is reported);
- ``infer_b16``: inference throughput at batch 16;
- ``infer_b1_onnx``, ``infer_b16_onnx``: the same with the network exported to ONNX (``himix_monai.export
  --format onnx``) and run by ONNX Runtime in float32 (skipped without ``onnxruntime``);
- ``text_cache``: a stream of batches with few distinct reports (as QaTa-COV19), with and without the text
  encoder's output cache;
- ``data_pipeline``: images/s of the bundle's ``base_transforms`` (``bundle/configs/train.json``) on the demo
  data, ``Dataset`` vs ``CacheDataset``, ``num_workers`` 0 vs 2, and the training augmentation on top;
- ``ct_volume``: a 64-slice 512x512 NIfTI volume through ``bundle/configs/inference.json`` to a NIfTI mask,
  end to end through ``python -m monai.bundle run``.

Every JSON line has ``case``, ``variant``, ``precision``, ``status`` (``ok``, ``skipped`` or ``error``),
``images_per_s``, ``latency_ms`` and ``peak_rss_mb`` (``null`` where a figure does not apply), plus
case-specific details, the torch thread count, ``OMP_WAIT_POLICY`` and the 1-minute load average before and after
the case: timings are only comparable on a quiet machine. On a busy one, torch's OpenMP threads spin at barriers
and slow down far more than the load suggests; ``OMP_WAIT_POLICY=PASSIVE`` or ``--threads 1`` keeps the figures
usable. See ``benchmarks/README.md`` for results and their analysis.

Usage (from the repository root)::

    python benchmarks/run.py                  # all cases, full settings (about 12 minutes on an idle 2-core CPU,
                                              # plus two ONNX exports of a few minutes each)
    python benchmarks/run.py --quick          # fewer steps and repeats (about 6 minutes)
    python benchmarks/run.py --cases train_step,infer_b1 --precisions bf16 --output results.jsonl
    python benchmarks/run.py --tiny --quick --threads 1 --one-process   # smoke test: test_convnext, tiny BERT
    python benchmarks/run.py --case infer_b1 --precision bf16   # one case in this process (what the parent runs)

The parent process imports only the standard library; the heavy imports happen in the case processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_CONFIG = REPO_ROOT / "bundle" / "configs" / "train.json"
INFERENCE_CONFIG = REPO_ROOT / "bundle" / "configs" / "inference.json"

PRECISIONS = ("fp32", "bf16")
VOLUME_REPORT = "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."
REQUIRED_KEYS = ("case", "variant", "precision", "status", "images_per_s", "latency_ms", "peak_rss_mb")


@dataclass(frozen=True)
class Settings:
    """Sizes and repeat counts of one benchmark run (see :func:`make_settings`)."""

    tiny: bool
    quick: bool
    image_size: int = 224
    train_batch: int = 8
    train_warmup: int = 2
    train_steps: int = 8
    infer_warmup: int = 3
    infer_repeats: int = 20
    b16_batch: int = 16
    b16_warmup: int = 1
    b16_repeats: int = 5
    cache_batch: int = 8
    cache_batches: int = 24
    cache_distinct_reports: int = 16
    pipeline_cases: int = 64
    pipeline_image_size: int = 128
    pipeline_epochs: int = 3
    volume_slices: int = 64
    volume_size: int = 512
    text_length: int = 24
    image_encoder: str = "convnext_tiny"


def make_settings(tiny: bool, quick: bool) -> Settings:
    """Full settings, fewer repeats with ``quick``, test_convnext + tiny BERT and small sizes with ``tiny``."""
    values: dict[str, Any] = {}
    if quick:
        values.update(
            train_warmup=1, train_steps=3, infer_warmup=2, infer_repeats=5, b16_repeats=2,
            cache_batches=8, pipeline_epochs=2,
        )  # fmt: skip
    if tiny:
        values.update(
            image_size=64, train_batch=2, train_warmup=1, train_steps=2, infer_warmup=1, infer_repeats=2,
            b16_batch=4, b16_warmup=1, b16_repeats=1, cache_batch=2, cache_batches=4, cache_distinct_reports=3,
            pipeline_cases=12, pipeline_image_size=64, pipeline_epochs=2, volume_slices=3, volume_size=64,
            text_length=8, image_encoder="test_convnext",
        )  # fmt: skip
    return Settings(tiny=tiny, quick=quick, **values)


# --------------------------------------------------------------------------------------------------------------
# helpers shared by the cases (imported lazily: the parent process never loads torch)
# --------------------------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def children_peak_rss_mb() -> float:
    """Peak resident memory of the largest finished child process, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def median_ms(seconds: list[float]) -> float:
    return round(1000.0 * statistics.median(seconds), 2)


def text_encoder_config(settings: Settings):
    """A 12-layer, 768-wide BERT configuration (CXR-BERT's size), or a 3-layer, 32-wide one with ``tiny``."""
    from transformers import BertConfig

    if settings.tiny:
        return BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64,
        )  # fmt: skip
    return BertConfig()


def build_network(
    settings: Settings, in_channels: int = 3, text_cache_size: int = 0, precision: str = "fp32", **kwargs: Any
):
    """HiMix with randomly initialised weights (no download): the image encoder and a BERT text encoder.

    Built as the bundle builds it for ``precision``: the frozen text encoder is created directly in the compute
    dtype (``text_encoder_dtype``), so it never holds a float32 copy. ``kwargs`` go to ``HiMix``.
    """
    import torch
    from transformers import BertModel

    from himix_monai.inferers import compute_dtype
    from himix_monai.networks import HiMix

    torch.manual_seed(0)
    dtype = compute_dtype(precision, "cpu")
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the random BERT is created in its storage dtype, as from_pretrained(dtype=)
    try:
        text_encoder = BertModel(text_encoder_config(settings), add_pooling_layer=False)
    finally:
        torch.set_default_dtype(default_dtype)
    extra: dict[str, Any] = dict(num_heads=4, text_tokens=(6, 4, 3)) if settings.tiny else {}
    return HiMix(
        in_channels=in_channels,
        image_encoder=settings.image_encoder,
        text_encoder=text_encoder,
        text_length=settings.text_length,
        text_cache_size=text_cache_size,
        text_encoder_dtype=dtype,
        **extra,
        **kwargs,
    )


def inference_network(settings: Settings, precision: str, text_cache_size: int = 0):
    """The network as ``inference.json`` holds it: eval mode, weights stored in the compute dtype."""
    from himix_monai.inferers import compute_dtype

    net = build_network(settings, in_channels=3, text_cache_size=text_cache_size, precision=precision)
    return net.to(dtype=compute_dtype(precision, "cpu")).eval()


def random_tokens(batch: int, length: int, vocab_size: int, seed: int = 0):
    """Token ids ``[CLS] w ... w [SEP] [PAD] ...`` of random lengths and their attention masks."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        used = int(torch.randint(max(3, length // 2), length + 1, (1,), generator=generator))
        ids[row, :used] = torch.randint(5, vocab_size, (used,), generator=generator)
        ids[row, 0], ids[row, used - 1] = 2, 3  # [CLS], [SEP]
        mask[row, :used] = 1
    return ids, mask


def autocast_context(precision: str):
    """The autocast context the bundle's ``AutocastInferer`` uses for ``precision`` on the CPU."""
    import torch

    from himix_monai.inferers import AutocastInferer

    dtype = AutocastInferer(precision=precision).autocast_dtype("cpu")
    return contextlib.nullcontext() if dtype is None else torch.autocast("cpu", dtype=dtype)


@contextlib.contextmanager
def precomputed_text(net, texts) -> Iterator[None]:
    """Make ``net.encode_text`` return ``texts`` so that ``net(...)`` runs the rest of its own forward only."""
    net.encode_text = lambda *args, **kwargs: texts
    try:
        yield
    finally:
        del net.encode_text


class Timer:
    """Collects wall-clock durations of named parts: ``with timer("forward"): ...``."""

    def __init__(self) -> None:
        self.parts: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.parts.setdefault(name, []).append(time.perf_counter() - start)

    def drop_first(self, count: int) -> None:
        """Forget the first ``count`` measurements of every part (warm-up)."""
        self.parts = {name: values[count:] for name, values in self.parts.items()}

    def medians_ms(self) -> dict[str, float]:
        return {f"{name}_ms": median_ms(values) for name, values in self.parts.items() if values}


def _memory_formats():
    import torch

    return {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


# --------------------------------------------------------------------------------------------------------------
# cases: each returns a list of result dictionaries
# --------------------------------------------------------------------------------------------------------------


def _all_parameters(net) -> list:
    """The network's parameters and those of its frozen text encoder (kept outside the network's state)."""
    encoder = getattr(net, "text_encoder", None)
    return list(net.parameters()) + (list(encoder.model.parameters()) if encoder is not None else [])


def _train_setup(settings: Settings, precision: str, allocator: bool = False, **network_kwargs: Any):
    """Network, loss, optimizer, inferer and one batch, as ``train.json`` sets them up.

    ``allocator``: call ``himix_monai.memory.configure_allocator()`` first, as the bundle's ``initialize`` does with
    ``--low_memory_allocator true`` (after the imports, before the network is built). ``network_kwargs`` go to
    ``HiMix`` (``gradient_checkpointing``: the bundle's ``--gradient_checkpointing``, off by default).
    """
    import torch
    from monai.losses import DiceCELoss

    from himix_monai.inferers import AutocastInferer
    from himix_monai.memory import configure_allocator

    if allocator:
        configure_allocator()
    net = build_network(settings, in_channels=3, precision=precision, **network_kwargs)
    net.train()
    loss_function = DiceCELoss(sigmoid=True, lambda_dice=0.5, lambda_ce=0.5)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=3e-4, fused=True)
    inferer = AutocastInferer(precision=precision)
    batch, size = settings.train_batch, settings.image_size
    torch.manual_seed(1)
    image = torch.rand(batch, 3, size, size)
    label = (torch.rand(batch, 1, size, size) > 0.7).float()
    input_ids, attention_mask = random_tokens(batch, settings.text_length, net.text_encoder.model.config.vocab_size)
    return net, loss_function, optimizer, inferer, (image, label, input_ids, attention_mask)


def _train_step(net, loss_function, optimizer, inferer, batch, precision: str, timer: Timer) -> None:
    import torch

    image, label, input_ids, attention_mask = batch
    step_start, cpu_start = time.perf_counter(), time.process_time()
    with timer("text_encoder"), autocast_context(precision):
        texts = net.encode_text(input_ids, attention_mask)
    with timer("forward"), precomputed_text(net, texts):
        loss = loss_function(inferer(image, net, input_ids, attention_mask), label)
    with timer("backward"):
        loss.backward()
    with timer("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    timer.parts.setdefault("step", []).append(time.perf_counter() - step_start)
    # CPU time of the process: with one thread, the work of the step, whatever share of the CPU the case got
    timer.parts.setdefault("step_cpu", []).append(time.process_time() - cpu_start)
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss.item()}")


def case_train_step(
    settings: Settings, precision: str, gradient_checkpointing: bool = False, allocator: bool = False
) -> list[dict]:
    """Training step time split into text encoder / forward + loss / backward / optimizer, as the bundle trains by
    default (``gradient_checkpointing`` and ``allocator``: its ``--gradient_checkpointing true`` and
    ``--low_memory_allocator true``)."""
    net, loss_function, optimizer, inferer, batch = _train_setup(
        settings, precision, allocator=allocator, gradient_checkpointing=gradient_checkpointing
    )
    timer = Timer()
    for _ in range(settings.train_warmup + settings.train_steps):
        _train_step(net, loss_function, optimizer, inferer, batch, precision, timer)
    timer.drop_first(settings.train_warmup)
    parts = timer.medians_ms()
    return [
        {
            "images_per_s": round(settings.train_batch / (parts["step_ms"] / 1000.0), 2),
            "latency_ms": parts["step_ms"],
            **parts,
            "batch": settings.train_batch,
            "image_size": settings.image_size,
            "steps": settings.train_steps,
            "gradient_checkpointing": gradient_checkpointing,
            "allocator_configured": allocator,
            # the frozen text encoder is not a registered submodule (it is not in the state dict): counted here
            "params_mb": round(sum(p.element_size() * p.nelement() for p in _all_parameters(net)) / 2**20, 1),
            "trainable_params_m": round(sum(p.nelement() for p in net.parameters() if p.requires_grad) / 1e6, 2),
        }
    ]


def case_train_step_checkpointed(settings: Settings, precision: str) -> list[dict]:
    """The training step with ``--gradient_checkpointing true`` (less memory, slower)."""
    return case_train_step(settings, precision, gradient_checkpointing=True)


def case_train_step_low_memory(settings: Settings, precision: str) -> list[dict]:
    """``--gradient_checkpointing true --low_memory_allocator true``: the smallest footprint (and the slowest)."""
    return case_train_step(settings, precision, gradient_checkpointing=True, allocator=True)


def case_train_ratio(settings: Settings, precision: str) -> list[dict]:
    """bf16 / fp32 training-step ratio, both networks in one process with their steps alternating.

    On a shared or throttled CPU two fresh processes can run at different speeds; alternating the steps exposes
    both precisions to the same conditions, so their ratio is robust where absolute times are not.
    """
    runs = {name: _train_setup(settings, name) for name in PRECISIONS}
    timers = {name: Timer() for name in PRECISIONS}
    for _ in range(settings.train_warmup + settings.train_steps):
        for name in PRECISIONS:
            _train_step(*runs[name], name, timers[name])
    steps = {}
    for name in PRECISIONS:
        timers[name].drop_first(settings.train_warmup)
        steps[name] = timers[name].medians_ms()["step_ms"]
    return [
        {
            "images_per_s": round(settings.train_batch / (steps["bf16"] / 1000.0), 2),
            "latency_ms": steps["bf16"],
            "fp32_step_ms": steps["fp32"],
            "bf16_step_ms": steps["bf16"],
            "bf16_to_fp32": round(steps["bf16"] / steps["fp32"], 3),
            "peak_rss_mb": None,  # two networks in one process: not a training footprint
            "batch": settings.train_batch,
            "image_size": settings.image_size,
            "steps": settings.train_steps,
        }
    ]


def _time_inference(net, image, input_ids, attention_mask, precision: str, warmup: int, repeats: int) -> list[float]:
    import torch

    from himix_monai.inferers import AutocastInferer

    inferer = AutocastInferer(precision=precision)
    durations = []
    with torch.inference_mode():
        for _ in range(warmup + repeats):
            start = time.perf_counter()
            inferer(image, net, input_ids, attention_mask)
            durations.append(time.perf_counter() - start)
    return durations[warmup:]


def _inference_case(settings: Settings, precision: str, batch: int, warmup: int, repeats: int) -> dict:
    """Latency of one batch in contiguous and channels-last memory format; the faster is the headline."""
    import torch

    net = inference_network(settings, precision)
    torch.manual_seed(1)
    image = torch.rand(batch, 3, settings.image_size, settings.image_size)
    input_ids, attention_mask = random_tokens(batch, settings.text_length, net.text_encoder.model.config.vocab_size)

    latencies: dict[str, float] = {}
    for name, memory_format in _memory_formats().items():
        net = net.to(memory_format=memory_format)
        durations = _time_inference(
            net, image.to(memory_format=memory_format), input_ids, attention_mask, precision, warmup, repeats
        )
        latencies[name] = median_ms(durations)
    best = min(latencies, key=latencies.get)
    net = net.to(memory_format=_memory_formats()[best])
    image = image.to(memory_format=_memory_formats()[best])

    # the text encoder alone, and the whole network when the report's encoding comes from the cache
    # (one prompt for a whole CT volume, or TextPromptInferer)
    text_durations = []
    with torch.inference_mode(), autocast_context(precision):
        for _ in range(warmup + repeats):
            start = time.perf_counter()
            net.encode_text(input_ids, attention_mask)
            text_durations.append(time.perf_counter() - start)
    net.text_encoder.cache_size = 16
    cached = _time_inference(net, image, input_ids, attention_mask, precision, warmup, repeats)
    return {
        "images_per_s": round(batch / (latencies[best] / 1000.0), 2),
        "latency_ms": latencies[best],
        "memory_format": best,
        "latency_contiguous_ms": latencies["contiguous"],
        "latency_channels_last_ms": latencies["channels_last"],
        "text_encoder_ms": median_ms(text_durations[warmup:]),
        "latency_text_cached_ms": median_ms(cached),
        "batch": batch,
        "image_size": settings.image_size,
        "repeats": repeats,
    }


def case_infer_b1(settings: Settings, precision: str) -> list[dict]:
    """Inference latency at batch 1 (eval, ``torch.inference_mode``)."""
    return [_inference_case(settings, precision, 1, settings.infer_warmup, settings.infer_repeats)]


def case_infer_b1_compiled(settings: Settings, precision: str) -> list[dict]:
    """Batch-1 latency with the image encoder and decoder stages compiled by ``torch.compile`` (inductor, frozen
    weights), report cached.

    What ``inference.json --compile true`` does; not the bundle's default, since compiling takes about a minute on a
    small CPU and again for every new input shape: it pays off for a server answering one image at a time.
    """
    import torch

    net = inference_network(settings, precision, text_cache_size=16).to(memory_format=torch.channels_last)
    torch.manual_seed(1)
    image = torch.rand(1, 3, settings.image_size, settings.image_size).to(memory_format=torch.channels_last)
    input_ids, attention_mask = random_tokens(1, settings.text_length, net.text_encoder.model.config.vocab_size)
    net.compile_for_inference()  # image encoder and decoder stages, weights frozen and pre-packed
    start = time.perf_counter()
    _time_inference(net, image, input_ids, attention_mask, precision, 1, 0)  # compiles
    compile_s = time.perf_counter() - start
    durations = _time_inference(net, image, input_ids, attention_mask, precision, settings.infer_warmup,
                                settings.infer_repeats)  # fmt: skip
    latency = median_ms(durations)
    return [
        {
            "images_per_s": round(1000.0 / latency, 2),
            "latency_ms": latency,
            "compile_s": round(compile_s, 1),
            "memory_format": "channels_last",
            "batch": 1,
            "image_size": settings.image_size,
            "repeats": settings.infer_repeats,
        }
    ]


def case_infer_b16(settings: Settings, precision: str) -> list[dict]:
    """Inference throughput at batch 16."""
    return [_inference_case(settings, precision, settings.b16_batch, settings.b16_warmup, settings.b16_repeats)]


def _onnx_runtime_case(settings: Settings, precision: str, batch: int, warmup: int, repeats: int) -> list[dict]:
    """The network exported with ``python -m himix_monai.export --format onnx`` and run by ONNX Runtime (CPU).

    The export is float32 (ONNX Runtime's CPU kernels are float32; there is no bf16 variant): compare it with the
    eager ``bf16`` and ``fp32`` lines of ``infer_b1``/``infer_b16``. The export (batch 2, dynamic axes) is checked
    against the eager network; ``max_abs_difference`` is the largest difference of the logits on the timed batch.
    """
    import torch

    from himix_monai.export import OnnxRuntimeModule, check_export, export_network

    try:
        import onnxruntime as ort
    except ImportError:
        return [{"status": "skipped", "reason": "onnxruntime is not installed (pip install 'himix-monai[onnx]')"}]
    net = inference_network(settings, "fp32")
    torch.manual_seed(1)
    image = torch.rand(batch, 3, settings.image_size, settings.image_size)
    input_ids, attention_mask = random_tokens(batch, settings.text_length, net.text_encoder.model.config.vocab_size)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        start = time.perf_counter()
        export_network(net, path, format="onnx", image_size=(settings.image_size, settings.image_size))
        export_s = time.perf_counter() - start
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        module = OnnxRuntimeModule(path, session_options=options)
        difference = check_export(net, module, (image, input_ids, attention_mask))
        durations = []
        for _ in range(warmup + repeats):
            start = time.perf_counter()
            module(image, input_ids, attention_mask)
            durations.append(time.perf_counter() - start)
        file_mb = path.stat().st_size / 2**20
    latency = median_ms(durations[warmup:])
    return [
        {
            "variant": "onnxruntime_fp32",
            "images_per_s": round(batch / (latency / 1000.0), 2),
            "latency_ms": latency,
            "export_s": round(export_s, 1),
            "max_abs_difference": difference,
            "onnx_file_mb": round(file_mb, 1),
            "onnxruntime": ort.__version__,
            "batch": batch,
            "image_size": settings.image_size,
            "repeats": repeats,
        }
    ]


def case_infer_b1_onnx(settings: Settings, precision: str) -> list[dict]:
    """ONNX Runtime latency at batch 1 (see :func:`_onnx_runtime_case`)."""
    return _onnx_runtime_case(settings, precision, 1, settings.infer_warmup, settings.infer_repeats)


def case_infer_b16_onnx(settings: Settings, precision: str) -> list[dict]:
    """ONNX Runtime throughput at batch 16 (see :func:`_onnx_runtime_case`)."""
    return _onnx_runtime_case(settings, precision, settings.b16_batch, settings.b16_warmup, settings.b16_repeats)


def case_text_cache(settings: Settings, precision: str) -> list[dict]:
    """A stream of inference batches drawn from few distinct reports, without and with the text cache."""
    import torch

    net = inference_network(settings, precision)
    batch, size = settings.cache_batch, settings.image_size
    vocab_size = net.text_encoder.model.config.vocab_size
    pool_ids, pool_mask = random_tokens(settings.cache_distinct_reports, settings.text_length, vocab_size)
    generator = torch.Generator().manual_seed(2)
    picks = [
        torch.randint(0, settings.cache_distinct_reports, (batch,), generator=generator)
        for _ in range(settings.cache_batches)
    ]
    image = torch.rand(batch, 3, size, size, generator=generator)
    from himix_monai.inferers import AutocastInferer

    inferer = AutocastInferer(precision=precision)

    encoder = net.text_encoder
    encoded_rows = [0]
    encode = encoder._encode

    def counting_encode(input_ids, attention_mask):  # counts the reports the text model really encodes
        encoded_rows[0] += int(input_ids.shape[0])
        return encode(input_ids, attention_mask)

    encoder._encode = counting_encode
    results: dict[str, dict[str, float]] = {}
    for label, cache_size in (("no_cache", 0), ("cache", 2048)):
        encoder.cache_size = cache_size
        text_s = rest_s = 0.0
        with torch.inference_mode():
            inferer(image, net, pool_ids[picks[0]], pool_mask[picks[0]])  # warm-up, not counted
            encoder.clear_cache()
            encoder.cache_hits = encoder.cache_misses = encoded_rows[0] = 0
            for pick in picks:
                start = time.perf_counter()
                with autocast_context(precision):
                    texts = net.encode_text(pool_ids[pick], pool_mask[pick])
                middle = time.perf_counter()
                with precomputed_text(net, texts):
                    inferer(image, net, pool_ids[pick], pool_mask[pick])
                text_s += middle - start
                rest_s += time.perf_counter() - middle
        seen = encoder.cache_hits + encoder.cache_misses
        results[label] = {
            "images_per_s": len(picks) * batch / (text_s + rest_s),
            "text_encoder_ms_per_batch": 1000.0 * text_s / len(picks),
            "hit_rate": encoder.cache_hits / seen if seen else 0.0,
            "encoded_rows": encoded_rows[0],
        }
    entry_bytes = sum(t.element_size() * t.nelement() for t in encoder._cache.values()) / max(1, len(encoder._cache))
    return [
        {
            "images_per_s": round(results["cache"]["images_per_s"], 2),
            "latency_ms": None,
            "images_per_s_no_cache": round(results["no_cache"]["images_per_s"], 2),
            "speedup": round(results["cache"]["images_per_s"] / results["no_cache"]["images_per_s"], 3),
            "text_encoder_ms_per_batch": round(results["cache"]["text_encoder_ms_per_batch"], 2),
            "text_encoder_ms_per_batch_no_cache": round(results["no_cache"]["text_encoder_ms_per_batch"], 2),
            "cache_hit_rate": round(results["cache"]["hit_rate"], 3),
            "reports_encoded": results["cache"]["encoded_rows"],
            "reports_encoded_no_cache": results["no_cache"]["encoded_rows"],
            "cache_kb_per_report": round(entry_bytes / 1024, 1),
            "distinct_reports": settings.cache_distinct_reports,
            "batches": len(picks),
            "batch": batch,
            "image_size": size,
        }
    ]


def _pipeline_items(settings: Settings, dataset_dir: Path) -> list[dict]:
    from monai.data import load_decathlon_datalist

    from himix_monai.demo.slices import ensure_demo_dataset

    datalist = ensure_demo_dataset(dataset_dir, num=settings.pipeline_cases, size=settings.pipeline_image_size)
    items: list[dict] = []
    for split in ("training", "validation", "test"):
        with contextlib.suppress(ValueError):
            items += load_decathlon_datalist(datalist, data_list_key=split)
    return items


def case_data_pipeline(settings: Settings, precision: str) -> list[dict]:
    """Images/s of the bundle's input pipeline: Dataset vs CacheDataset, 0 vs 2 workers, with augmentation."""
    import torch
    from monai.bundle import ConfigParser
    from monai.data import CacheDataset, DataLoader, Dataset
    from monai.transforms import Compose

    parser = ConfigParser()
    parser.read_config(str(TRAIN_CONFIG))
    base = Compose(parser.get_parsed_content("base_transforms"))
    train = parser.get_parsed_content("train#preprocessing")  # base_transforms + the training augmentation
    batch = int(parser["batch_size"])
    results = []
    with tempfile.TemporaryDirectory(prefix="himix_bench_data_") as tmp:
        items = _pipeline_items(settings, Path(tmp))
        variants = [
            ("dataset", base, False, 0),
            ("dataset", base, False, 2),
            ("cache", base, True, 0),
            ("cache", base, True, 2),
            ("cache+aug", train, True, 0),
            ("cache+aug", train, True, 2),
        ]
        for name, transform, cached, workers in variants:
            build_start = time.perf_counter()
            if cached:
                dataset = CacheDataset(items, transform, cache_rate=1.0, num_workers=workers or None, progress=False)
            else:
                dataset = Dataset(items, transform)
            build_s = time.perf_counter() - build_start
            loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers)
            epochs = []
            for _ in range(settings.pipeline_epochs):
                start = time.perf_counter()
                count = sum(int(data["image"].shape[0]) for data in loader)
                epochs.append(time.perf_counter() - start)
            steady = statistics.median(epochs[1:] if len(epochs) > 1 else epochs)
            sample = dataset[0]
            item_bytes = sum(v.element_size() * v.nelement() for v in sample.values() if isinstance(v, torch.Tensor))
            results.append(
                {
                    "variant": f"{name} w{workers}",
                    "images_per_s": round(count / steady, 1),
                    "latency_ms": None,
                    "first_epoch_images_per_s": round(count / epochs[0], 1),
                    "cache_build_s": round(build_s, 3) if cached else None,
                    "tensor_bytes_per_item": item_bytes,
                    "num_workers": workers,
                    "items": count,
                    "image_size": int(sample["image"].shape[-1]),
                    "peak_rss_mb": peak_rss_mb(),
                    "workers_peak_rss_mb": children_peak_rss_mb(),
                }
            )
            del loader, dataset
    return results


def _write_volume(path: Path, slices: int, size: int) -> None:
    """A chest-CT-like int16 HU volume: a few demo phantom slices repeated (MONAI layout: axis 0 = columns)."""
    import nibabel as nib
    import numpy as np

    from himix_monai.demo.slices import synthesize_chest_slice

    phantoms = [synthesize_chest_slice(seed=0, index=index, size=size).hu.T for index in range(min(slices, 4))]
    volume = np.stack([phantoms[index % len(phantoms)] for index in range(slices)], axis=-1)
    affine = np.diag([350.0 / size, 350.0 / size, 1.0, 1.0])
    nib.save(nib.Nifti1Image(volume.astype(np.int16), affine), str(path))


def _volume_overrides(config: dict, root: Path, volume: Path, settings: Settings, precision: str) -> list[str]:
    """Command-line overrides of inference.json: a temp bundle root and an input folder with one volume."""
    (volume.parent / "texts.json").write_text(json.dumps({volume.name: VOLUME_REPORT}))
    args = ["--bundle_root", str(root), "--input_dir", str(volume.parent), "--output_dir", str(root / "output")]
    if "precision" in config:
        args += ["--precision", precision]
    if settings.tiny and "image_encoder" in config:
        args += ["--image_encoder", settings.image_encoder]
    return args


def _bundle_environment() -> dict[str, str]:
    """The environment of the bundle process: this process's torch thread count as ``OMP_NUM_THREADS``."""
    import torch

    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


def case_ct_volume(settings: Settings, precision: str) -> list[dict]:
    """A NIfTI CT volume through ``bundle/configs/inference.json`` to a NIfTI mask, via ``monai.bundle run``."""
    if not INFERENCE_CONFIG.is_file():
        return [{"status": "skipped", "reason": f"{INFERENCE_CONFIG.relative_to(REPO_ROOT)} does not exist yet"}]
    import nibabel as nib
    import torch
    from monai.bundle import ConfigParser

    config = json.loads(INFERENCE_CONFIG.read_text())
    with tempfile.TemporaryDirectory(prefix="himix_bench_ct_") as tmp:
        root = Path(tmp)
        (root / "input").mkdir()
        volume = root / "input" / "volume.nii.gz"
        _write_volume(volume, settings.volume_slices, settings.volume_size)
        overrides = _volume_overrides(config, root, volume, settings, precision)

        # a checkpoint of a freshly initialised network: the timing does not depend on the weights
        parser = ConfigParser()
        parser.read_config(str(INFERENCE_CONFIG))
        parser.update({key.lstrip("-"): value for key, value in zip(overrides[::2], overrides[1::2])})
        (root / "models").mkdir(exist_ok=True)
        torch.save(parser.get_parsed_content("network_def").state_dict(), root / "models" / "model.pt")

        command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(INFERENCE_CONFIG), *overrides]
        start = time.perf_counter()
        completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=_bundle_environment())
        wall_s = time.perf_counter() - start
        if completed.returncode != 0:
            raise RuntimeError(f"monai.bundle run failed:\n{completed.stderr[-3000:]}")
        masks = sorted(p for p in root.rglob("*.nii*") if p != volume)
        if not masks:
            raise RuntimeError(f"no NIfTI mask written under {root}; stdout:\n{completed.stdout[-2000:]}")
        mask_shape = list(nib.load(str(masks[0])).shape)

        # the same run inside this already-started interpreter: the cost of one more volume in a running
        # process (a folder of volumes, a server), without the interpreter start-up and the imports
        from monai.bundle import run as run_bundle

        in_process = {key.lstrip("-"): value for key, value in zip(overrides[::2], overrides[1::2])}
        in_process["output_dir"] = str(root / "output_in_process")
        start = time.perf_counter()
        run_bundle(config_file=str(INFERENCE_CONFIG), **in_process)
        in_process_s = round(time.perf_counter() - start, 2)

        import_s = None
        if not settings.tiny:  # the fixed cost of a fresh interpreter importing what the bundle needs
            start = time.perf_counter()
            command = [sys.executable, "-c", "import torch, monai, timm, transformers, himix_monai.networks"]
            subprocess.run(command, cwd=REPO_ROOT, check=True, env=_bundle_environment())
            import_s = round(time.perf_counter() - start, 2)
    return [
        {
            "images_per_s": round(settings.volume_slices / wall_s, 2),
            "latency_ms": round(1000.0 * wall_s, 1),
            "wall_s": round(wall_s, 2),
            "import_s": import_s,
            "in_process_s": in_process_s,
            "slices": settings.volume_slices,
            "slice_size": settings.volume_size,
            "mask_shape": mask_shape,
            "peak_rss_mb": children_peak_rss_mb(),
            "overrides": overrides,
        }
    ]


CASES: dict[str, tuple[Callable[[Settings, str], list[dict]], tuple[str, ...]]] = {
    "train_step": (case_train_step, PRECISIONS),
    "train_step_checkpointed": (case_train_step_checkpointed, ("bf16",)),
    "train_step_low_memory": (case_train_step_low_memory, ("bf16",)),
    "train_ratio": (case_train_ratio, ("bf16",)),
    "infer_b1": (case_infer_b1, PRECISIONS),
    "infer_b1_compiled": (case_infer_b1_compiled, ("bf16",)),
    "infer_b16": (case_infer_b16, PRECISIONS),
    "infer_b1_onnx": (case_infer_b1_onnx, ("fp32",)),
    "infer_b16_onnx": (case_infer_b16_onnx, ("fp32",)),
    "text_cache": (case_text_cache, PRECISIONS),
    "data_pipeline": (case_data_pipeline, ("fp32",)),
    "ct_volume": (case_ct_volume, PRECISIONS),
}


# --------------------------------------------------------------------------------------------------------------
# running cases and reporting
# --------------------------------------------------------------------------------------------------------------


def complete(result: dict, case: str, precision: str) -> dict:
    """Fill the keys every JSON line carries, keeping what the case set."""
    line: dict[str, Any] = {key: None for key in REQUIRED_KEYS}
    line.update(case=case, variant="", precision=precision, status="ok")
    line.update(result)
    return line


def run_case_here(case: str, precision: str, settings: Settings, threads: int | None) -> list[dict]:
    """Run one case in this process and return its completed result lines."""
    import monai  # noqa: F401  (imported first so that rss_after_imports_mb is the fixed cost of the stack)
    import timm  # noqa: F401
    import torch
    import transformers  # noqa: F401

    import himix_monai.networks  # noqa: F401

    if threads:
        torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    rss_at_start = peak_rss_mb()
    start = time.perf_counter()
    function = CASES[case][0]
    try:
        results = function(settings, precision)
    except Exception as error:  # reported as a result line; the parent carries on with the other cases
        results = [{"status": "error", "error": f"{type(error).__name__}: {error}"[-2000:]}]
    lines = []
    for result in results:
        result.setdefault("peak_rss_mb", peak_rss_mb())
        result.update(
            threads=torch.get_num_threads(),
            omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", ""),
            malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_", ""),
            rss_after_imports_mb=rss_at_start,
            load_avg_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)],
            elapsed_s=round(time.perf_counter() - start, 2),
            tiny=settings.tiny,
            quick=settings.quick,
        )
        lines.append(complete(result, case, precision))
    return lines


def run_cases_subprocess(plan: list[tuple[str, str]], args: argparse.Namespace) -> list[dict]:
    """Run ``plan`` (pairs of case and precision) in one fresh interpreter (this script with ``--case``)."""
    cases = ",".join(dict.fromkeys(case for case, _ in plan))
    precisions = ",".join(dict.fromkeys(precision for _, precision in plan))
    command = [sys.executable, str(Path(__file__).resolve()), "--case", cases, "--precision", precisions]
    command += [flag for flag, on in (("--quick", args.quick), ("--tiny", args.tiny)) if on]
    if args.threads:
        command += ["--threads", str(args.threads)]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    lines = []
    for text in completed.stdout.splitlines():
        if text.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                line = json.loads(text)
                if isinstance(line, dict) and (line.get("case"), line.get("precision")) in plan:
                    lines.append(line)
    done = {(line["case"], line["precision"]) for line in lines}
    if completed.returncode != 0 or len(done) < len(plan):
        error = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        for case, precision in plan:
            if (case, precision) not in done:
                message = f"case process exit code {completed.returncode}: {error}"
                lines.append(complete({"status": "error", "error": message}, case, precision))
    return lines


def _format(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _details(line: dict) -> str:
    """A short human-readable summary of the case-specific figures."""
    if line["status"] != "ok":
        message = (line.get("reason") or line.get("error") or "").strip().splitlines()
        return message[-1][:160] if message else ""
    case = line["case"]
    if case == "train_ratio":
        return (
            f"fp32 {line['fp32_step_ms']:.0f} / bf16 {line['bf16_step_ms']:.0f} ms per step: "
            f"x{line['bf16_to_fp32']:.3f}"
        )
    if case.startswith("train_step"):
        malloc = "; low-memory allocator setting" if line.get("allocator_configured") else ""
        malloc += "; gradient checkpointing" if line.get("gradient_checkpointing") else ""
        if line.get("malloc_mmap_threshold"):
            malloc += f"; MALLOC_MMAP_THRESHOLD_={line['malloc_mmap_threshold']}"
        return (
            f"text {line['text_encoder_ms']:.0f} / fwd+loss {line['forward_ms']:.0f} / bwd {line['backward_ms']:.0f} / "
            f"opt {line['optimizer_ms']:.0f} ms{malloc}"
        )
    if case.endswith("_onnx"):
        return (
            f"ONNX Runtime {line['onnxruntime']} fp32, max abs difference {line['max_abs_difference']:.1e}; "
            f"export {line['export_s']:.0f} s, {line['onnx_file_mb']:.0f} MB file"
        )
    if case == "infer_b1_compiled":
        return f"torch.compile, report cached, channels-last; compiling took {line['compile_s']:.0f} s"
    if case.startswith("infer_"):
        return (
            f"{line['memory_format']} (contig {line['latency_contiguous_ms']:.0f}, ch-last "
            f"{line['latency_channels_last_ms']:.0f} ms); text {line['text_encoder_ms']:.0f} ms; "
            f"text cached {line['latency_text_cached_ms']:.0f} ms"
        )
    if case == "text_cache":
        return (
            f"no cache {line['images_per_s_no_cache']:.1f} img/s, x{line['speedup']:.2f}; text "
            f"{line['text_encoder_ms_per_batch_no_cache']:.1f} -> {line['text_encoder_ms_per_batch']:.1f} ms/batch, "
            f"hits {100 * line['cache_hit_rate']:.0f}%, {line['reports_encoded']} of "
            f"{line['reports_encoded_no_cache']} reports encoded, {line['cache_kb_per_report']:.0f} KB/report cached"
        )
    if case == "data_pipeline":
        build = f", cache build {line['cache_build_s']:.2f} s" if line.get("cache_build_s") is not None else ""
        return f"1st epoch {line['first_epoch_images_per_s']:.0f} img/s{build}"
    if case == "ct_volume":
        imports = f" (interpreter + imports {line['import_s']:.1f} s)" if line.get("import_s") is not None else ""
        in_process = f"; {line['in_process_s']:.1f} s in a running process" if line.get("in_process_s") else ""
        return f"{line['slices']} slices {line['slice_size']}^2 in {line['wall_s']:.1f} s{imports}{in_process}"
    return ""


def print_table(lines: list[dict]) -> None:
    header = ("case", "variant", "prec", "status", "img/s", "latency ms", "peak RSS MB", "details")
    rows = [
        (
            line["case"], line.get("variant") or "", line["precision"], line["status"],
            _format(line["images_per_s"]), _format(line["latency_ms"]), _format(line["peak_rss_mb"], 0),
            _details(line),
        )
        for line in lines
    ]  # fmt: skip
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (a few minutes in all)")
    parser.add_argument("--tiny", action="store_true", help="test_convnext, tiny BERT, small sizes (smoke test)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated subset of fp32, bf16")
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="run all cases in ONE fresh process (faster to start; peak_rss_mb is then cumulative): smoke tests",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON lines to this file")
    parser.add_argument(
        "--case", default=None, help="run these cases (comma-separated) in THIS process; used by the parent"
    )
    parser.add_argument("--precision", default="fp32", help="precisions (comma-separated) of --case")
    args = parser.parse_args(argv)
    for option in ("cases", "case"):
        for name in (getattr(args, option) or "").split(","):
            if name and name not in CASES:
                parser.error(f"unknown case {name!r} in --{option}; choose from {', '.join(CASES)}")
    for option in ("precisions", "precision"):
        for name in getattr(args, option).split(","):
            if name not in PRECISIONS:
                parser.error(f"unknown precision {name!r} in --{option}; choose from {', '.join(PRECISIONS)}")
    return args


def make_plan(cases: str, precisions: str) -> list[tuple[str, str]]:
    """The (case, precision) pairs to run: each case at each of the precisions it supports."""
    wanted = precisions.split(",")
    return [(case, p) for case in cases.split(",") for p in CASES[case][1] if p in wanted]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.case:  # case process: JSON lines only
        settings = make_settings(args.tiny, args.quick)
        for case, precision in make_plan(args.case, args.precision):
            for line in run_case_here(case, precision, settings, args.threads):
                print(json.dumps(line), flush=True)
        return 0

    plan = make_plan(args.cases, args.precisions)
    print(
        f"# {len(plan)} case runs, {os.cpu_count()} CPUs, load average {os.getloadavg()}, quick={args.quick}, "
        f"tiny={args.tiny}",
        file=sys.stderr,
    )
    groups = [plan] if args.one_process else [[pair] for pair in plan]
    lines: list[dict] = []
    output = open(args.output, "w", encoding="utf-8") if args.output else contextlib.nullcontext()
    with output as handle:
        for group in groups:
            for line in run_cases_subprocess(group, args):
                lines.append(line)
                print(json.dumps(line), flush=True)
                if handle is not None:
                    handle.write(json.dumps(line) + "\n")
                    handle.flush()
    print()
    print_table(lines)
    return 1 if any(line["status"] == "error" for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
