"""Export a trained HiMix network, checked against the eager network: the one place for every export format.

Formats (``FORMATS``): ``torch_export`` (recommended for PyTorch), ``onnx`` (checked with ONNX Runtime) and
``torchscript`` (for MONAI's tooling). A format is one function ``export_<format>(network, filepath, inputs,
extra_files, verify, rtol, atol)`` registered in ``_EXPORTERS`` and one loader in ``_LOADERS``
(:py:func:`load_exported`); :py:func:`check_export` compares any exported file with the eager network.

torch.export (``--format torch_export``, ``.pt2``): an ``ExportedProgram`` (``torch.export.export``) saved with
``torch.export.save``; load it with ``torch.export.load(path).module()``. The whole network is exported, the
Hugging Face text encoder included (no trace of its own). Batch size and image size (multiples of 32) are
dynamic; ``input_ids`` and ``attention_mask`` have exactly ``text_length`` tokens (tokenise with
``padding="max_length"``, as the bundle does). While exporting, ASRM uses its matrix form of the spectral filter
(:py:class:`~himix_monai.networks.blocks.AdaptiveSpectrumRefinement`, equal to the FFT up to float32 rounding)
and the text encoder's cache is skipped; the eager network is unchanged.

ONNX (``--format onnx``, ``.onnx``): the same program translated by PyTorch's dynamo ONNX exporter
(``torch.onnx.export(..., dynamo=True)``), inputs ``image``, ``input_ids``, ``attention_mask`` and output ``pred``
(logits), the same dynamic axes; ``metadata.json`` is stored in the model's ``metadata_props``. It is checked
with ONNX Runtime (``pip install himix-monai[onnx]``).

TorchScript (``--format torchscript``, ``.ts``): the network is compiled with ``torch.jit.script``, as
``python -m monai.bundle ckpt_export`` (the model zoo's TorchScript check) does by default. ``torch.jit.script``
cannot compile a Hugging Face model, so the frozen text encoder is traced (``torch.jit.trace``) inside the
scripted network, see :py:class:`~himix_monai.networks.blocks.text_encoder.ScriptableTextEncoder`; the rest of
HiMix is scripted. The exported module takes ``(image, input_ids, attention_mask)`` with any batch size, any
image size divisible by 32 and up to ``text_length`` tokens, the text arguments optional (image-only decoding,
as the eager network). It is checked with MONAI's ``convert_to_torchscript(verify=True)``.

Every format is checked on an image and a tokenised report with padding (batch 2), and the command prints the
largest absolute difference from the eager logits.

Command line::

    python -m himix_monai.export --config_file bundle/configs/inference.json \\
        --ckpt_file bundle/models/model.pt --filepath bundle/models/model.pt2 --format torch_export [--device cuda:0]

Export on the device that will run the file (``--device``): the traced text encoder of the TorchScript file keeps
the device of its tracing example as a constant, so a file exported on the CPU runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.networks.utils import convert_to_torchscript

from himix_monai.checkpoints import load_network_weights
from himix_monai.networks.nets.himix import HiMix

__all__ = [
    "FORMATS",
    "OnnxRuntimeModule",
    "check_export",
    "dynamic_shapes",
    "example_inputs",
    "export_network",
    "export_onnx",
    "export_torch",
    "export_torchscript",
    "load_exported",
    "main",
]


def example_inputs(
    network: HiMix, image_size: Sequence[int] = (224, 224), in_channels: int | None = None, batch_size: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random example inputs: an image and ``text_length`` tokens of which the second half is padding."""
    if in_channels is None:
        in_channels = _stem_channels(network)
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(batch_size, in_channels, *image_size, generator=generator)
    vocab_size = network.text_encoder.model.config.vocab_size if network.text_encoder is not None else 2
    input_ids = torch.randint(1, vocab_size, (batch_size, network.text_length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[:, network.text_length // 2 :] = 0
    input_ids[:, network.text_length // 2 :] = 0
    return image, input_ids, attention_mask


def _stem_channels(network: HiMix) -> int:
    first_conv = next(m for m in network.image_encoder.modules() if isinstance(m, torch.nn.Conv2d))
    return int(first_conv.in_channels)


def export_torchscript(
    network: HiMix,
    filepath: str | os.PathLike,
    inputs: Sequence[torch.Tensor],
    extra_files: dict[str, str] | None = None,
    verify: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-4,
) -> torch.jit.ScriptModule:
    """Script ``network`` (its text encoder traced) and save it; verify against the eager output on ``inputs``.

    Args:
        network: a HiMix network in eval mode; it is not changed.
        filepath: output ``.ts`` file.
        inputs: ``(image, input_ids, attention_mask)`` to verify with.
        extra_files: text files stored inside the archive (e.g. the bundle's metadata).
        verify: compare the exported and eager outputs on ``inputs`` (MONAI's check).
        rtol: relative tolerance of the check.
        atol: absolute tolerance of the check.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.13: torch.jit is deprecated; MONAI needs it
        return convert_to_torchscript(
            network,
            filename_or_obj=filepath,
            extra_files={k: v.encode() for k, v in (extra_files or {}).items()},
            verify=verify,
            inputs=list(inputs),
            use_trace=False,
            rtol=rtol,
            atol=atol,
        )


def _network_inputs(network: HiMix, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The inputs the exported graph takes: the image only for a network without a text encoder."""
    return tuple(inputs[:1]) if network.text_encoder is None else tuple(inputs[:3])


def dynamic_shapes(network: HiMix) -> dict[str, dict[int, Any]]:
    """``torch.export`` dynamic shapes of HiMix: any batch size and any image size divisible by the encoder stride.

    The number of tokens is fixed at ``text_length`` (the token-axis projections of the decoder need exactly that
    many; the bundle's tokenizer pads to it).
    """
    from torch.export import Dim

    batch = Dim("batch", min=1)
    shapes: dict[str, dict[int, Any]] = {
        "image": {
            0: batch,
            2: network.size_divisor * Dim("height_blocks", min=1),
            3: network.size_divisor * Dim("width_blocks", min=1),
        }
    }
    if network.text_encoder is not None:
        shapes.update(input_ids={0: batch}, attention_mask={0: batch})
    return shapes


def _export_program(network: HiMix, inputs: Sequence[torch.Tensor]) -> torch.export.ExportedProgram:
    inputs = _network_inputs(network, inputs)
    shapes = tuple(dynamic_shapes(network).values())
    with torch.no_grad():
        return torch.export.export(network, inputs, dynamic_shapes=shapes)


def export_torch(
    network: HiMix,
    filepath: str | os.PathLike,
    inputs: Sequence[torch.Tensor],
    extra_files: dict[str, str] | None = None,
    verify: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-4,
) -> torch.export.ExportedProgram:
    """Export ``network`` with ``torch.export`` (dynamic batch and image size) and save it with ``torch.export.save``.

    Args:
        network: a HiMix network in eval mode; it is not changed.
        filepath: output file (``.pt2``).
        inputs: ``(image, input_ids, attention_mask)``, the example to export with and to verify on.
        extra_files: text files stored in the archive (``torch.export.load(path, extra_files=...)`` reads them).
        verify: load the saved file and compare it with the eager network on ``inputs``.
        rtol: relative tolerance of the check.
        atol: absolute tolerance of the check.

    Returns:
        the ``ExportedProgram``.
    """
    program = _export_program(network, inputs)
    torch.export.save(program, os.fspath(filepath), extra_files=dict(extra_files or {}))
    if verify:
        check_export(network, load_exported(filepath, "torch_export"), inputs, rtol, atol)
    return program


def export_onnx(
    network: HiMix,
    filepath: str | os.PathLike,
    inputs: Sequence[torch.Tensor],
    extra_files: dict[str, str] | None = None,
    verify: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-4,
) -> Any:
    """Export ``network`` to ONNX with the dynamo exporter (dynamic batch and image size); verify with ONNX Runtime.

    Args:
        network: a HiMix network in eval mode; it is not changed.
        filepath: output file (``.onnx``; one file, the weights inside).
        inputs: ``(image, input_ids, attention_mask)``, the example to export with and to verify on.
        extra_files: text stored in the model's ``metadata_props`` under the file names.
        verify: run the saved file with ONNX Runtime and compare it with the eager network on ``inputs``.
        rtol: relative tolerance of the check.
        atol: absolute tolerance of the check.

    Returns:
        the ``torch.onnx.ONNXProgram``.
    """
    if verify:
        _import_onnxruntime()  # fail before the (long) export when the check cannot run
    program = _export_program(network, inputs)
    names = ["image", "input_ids", "attention_mask"][: len(_network_inputs(network, inputs))]
    # the optimizer's constant folding logs a warning for every reshape whose shape is only known at run time
    folding_log = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folding_log.level
    folding_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "axis name batch will not be used": shared by the inputs
            onnx_program = torch.onnx.export(
                program, input_names=names, output_names=["pred"], dynamo=True, external_data=False, verbose=False
            )
    finally:
        folding_log.setLevel(level)
    for name, text in (extra_files or {}).items():
        onnx_program.model.metadata_props[name] = text
    onnx_program.save(os.fspath(filepath), external_data=False)
    if verify:
        check_export(network, load_exported(filepath, "onnx"), inputs, rtol, atol)
    return onnx_program


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(
            "checking or running an ONNX export needs ONNX Runtime: pip install 'himix-monai[onnx]' "
            "(or pip install onnxruntime)."
        ) from error
    return onnxruntime


class OnnxRuntimeModule:
    """An ONNX file run with ONNX Runtime, called like the network: ``module(image, input_ids, attention_mask)``.

    Takes and returns torch tensors (on the CPU); the provider is the CPU unless ``providers`` names others.

    Args:
        filepath: the ``.onnx`` file.
        providers: ONNX Runtime execution providers (default ``["CPUExecutionProvider"]``).
        session_options: an ``onnxruntime.SessionOptions`` (threads, graph optimisation level).

    Examples::

        module = OnnxRuntimeModule("model.onnx")
        logits = module(image, input_ids, attention_mask)
    """

    def __init__(
        self, filepath: str | os.PathLike, providers: Sequence[str] | None = None, session_options: Any = None
    ) -> None:
        ort = _import_onnxruntime()
        self.session = ort.InferenceSession(
            os.fspath(filepath), sess_options=session_options, providers=list(providers or ["CPUExecutionProvider"])
        )
        self.input_names = [node.name for node in self.session.get_inputs()]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.input_names):
            raise ValueError(
                f"this ONNX model takes {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}; "
                "an exported HiMix with a text encoder needs the tokenised report (text_length tokens)."
            )
        feed = {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, inputs)}
        return torch.from_numpy(self.session.run(None, feed)[0])


def _load_torchscript(filepath: str | os.PathLike, device: str = "cpu") -> Callable[..., torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.13: torch.jit.load is deprecated
        return torch.jit.load(os.fspath(filepath), map_location=device)


def _load_torch_export(filepath: str | os.PathLike, device: str = "cpu") -> Callable[..., torch.Tensor]:
    module = torch.export.load(os.fspath(filepath)).module()
    return module.to(device) if torch.device(device).type != "cpu" else module


def _load_onnx(filepath: str | os.PathLike, device: str = "cpu") -> Callable[..., torch.Tensor]:
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if torch.device(device).type == "cuda" else None
    return OnnxRuntimeModule(filepath, providers=providers)


_EXPORTERS: dict[str, Callable[..., Any]] = {
    "torch_export": export_torch,
    "onnx": export_onnx,
    "torchscript": export_torchscript,
}
_LOADERS: dict[str, Callable[..., Callable[..., torch.Tensor]]] = {
    "torch_export": _load_torch_export,
    "onnx": _load_onnx,
    "torchscript": _load_torchscript,
}
_SUFFIXES = {".pt2": "torch_export", ".onnx": "onnx", ".ts": "torchscript"}
FORMATS: tuple[str, ...] = tuple(_EXPORTERS)


def load_exported(
    filepath: str | os.PathLike, format: str | None = None, device: str = "cpu"  # noqa: A002 (the option's name)
) -> Callable[..., torch.Tensor]:
    """Load an exported file as a callable ``(image, input_ids, attention_mask) -> logits``.

    Args:
        filepath: the exported file.
        format: one of :data:`FORMATS`; by default from the suffix (``.pt2``, ``.onnx``, ``.ts``).
        device: where to run it (ONNX: the CUDA provider for a CUDA device).

    Examples::

        module = load_exported("model.pt2")
        logits = module(image, input_ids, attention_mask)
    """
    if format is None:
        format = _SUFFIXES.get(os.path.splitext(os.fspath(filepath))[1].lower())  # noqa: A001
        if format is None:
            raise ValueError(f"cannot tell the export format of {os.fspath(filepath)!r}: give format= {list(FORMATS)}.")
    if format not in _LOADERS:
        raise ValueError(f"export format must be one of {list(FORMATS)}, got {format!r}.")
    return _LOADERS[format](filepath, device)


def check_export(
    network: HiMix,
    exported: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    rtol: float = 1e-4,
    atol: float = 1e-4,
) -> float:
    """Compare an exported module with the eager ``network`` on ``inputs``; the largest absolute difference.

    Args:
        network: the eager network (eval mode).
        exported: a callable from :py:func:`load_exported`.
        inputs: ``(image, input_ids, attention_mask)``.
        rtol: relative tolerance.
        atol: absolute tolerance.

    Raises:
        AssertionError: the outputs differ by more than the tolerance (``torch.testing.assert_close``).
    """
    inputs = _network_inputs(network, inputs)
    with torch.no_grad():
        expected = network(*inputs)
        actual = exported(*inputs)
    expected = torch.as_tensor(expected).detach().float().cpu()
    actual = torch.as_tensor(actual).detach().float().cpu()
    if actual.shape != expected.shape:
        raise AssertionError(f"exported output shape {list(actual.shape)} != eager {list(expected.shape)}")
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    return float((actual - expected).abs().max())


def export_network(
    network: HiMix,
    filepath: str | os.PathLike,
    format: str | None = None,  # noqa: A002 (the option's name)
    image_size: Sequence[int] = (224, 224),
    extra_files: dict[str, str] | None = None,
    verify: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-4,
) -> Any:
    """Export ``network`` in ``format`` and check it against the eager network on an image and a report.

    Args:
        network: a HiMix network (put in eval mode).
        filepath: the output file.
        format: one of :data:`FORMATS`; by default from the suffix of ``filepath`` (``.pt2``: ``torch_export``,
            ``.onnx``: ``onnx``), otherwise ``torchscript``.
        image_size: spatial size of the example image (any size divisible by 32 works afterwards).
        extra_files: text files stored with the export where the format allows (TorchScript: in the archive).
        verify: compare the exported and eager outputs.
        rtol: relative tolerance of the check.
        atol: absolute tolerance of the check.

    Returns:
        what the format's exporter returns (TorchScript: the ``ScriptModule``).

    Examples::

        net = HiMix(in_channels=1, text_encoder=minilm_path).eval()
        export_network(net, "model.ts", image_size=(224, 224))
    """
    if format is None:
        format = _SUFFIXES.get(os.path.splitext(os.fspath(filepath))[1].lower(), "torchscript")  # noqa: A001
    if format not in _EXPORTERS:
        raise ValueError(f"export format must be one of {list(FORMATS)}, got {format!r}.")
    network = network.eval()
    inputs = _export_inputs(network, image_size)
    return _EXPORTERS[format](network, filepath, inputs, extra_files, verify, rtol, atol)


def _export_inputs(network: HiMix, image_size: Sequence[int]) -> list[torch.Tensor]:
    device = next(network.parameters()).device  # the exported module runs on the device it was exported on
    return [t.to(device) for t in example_inputs(network, image_size, _stem_channels(network), batch_size=2)]


def _parse_overrides(tokens: Sequence[str]) -> dict:
    """``--id value`` pairs as ``python -m monai.bundle`` takes them; values are JSON where they parse."""
    if len(tokens) % 2:
        raise SystemExit(f"overrides must be '--id value' pairs, got {list(tokens)}")
    pairs = {}
    for key, value in zip(tokens[::2], tokens[1::2]):
        if not key.startswith("--"):
            raise SystemExit(f"expected an option like --id, got {key!r}")
        try:
            pairs[key[2:]] = json.loads(value)
        except json.JSONDecodeError:
            pairs[key[2:]] = value
    return pairs


def main(argv: Sequence[str] | None = None) -> int:
    """Build ``network_def`` from a bundle config, load a checkpoint and export it.

    The checkpoint is loaded with :py:func:`himix_monai.checkpoints.load_network_weights` (``weights_only=True``;
    keys, shapes, recorded settings and the text encoder's fingerprint compared first, one readable error when
    they do not fit).
    """
    from monai.bundle import ConfigParser

    parser = argparse.ArgumentParser(prog="python -m himix_monai.export", description=__doc__.split("\n")[0])
    parser.add_argument("--config_file", required=True, help="bundle config defining network_def")
    parser.add_argument("--ckpt_file", required=True, help="checkpoint with the network weights (models/model.pt)")
    parser.add_argument("--filepath", required=True, help="output file (models/model.pt2, .onnx or .ts)")
    parser.add_argument(
        "--format", default=None, choices=FORMATS,
        help="export format (default: from the file's suffix: .pt2 torch_export, .onnx onnx, otherwise torchscript)",
    )
    parser.add_argument(
        "--device", default="cpu", help="device to export on and for (e.g. cuda:0); the text encoder's trace "
        "fixes device constants, so export on the device type that will run the file"
    )
    parser.add_argument("--meta_file", default=None, help="metadata.json to store in the file")
    parser.add_argument("--image_size", type=int, nargs=2, default=None, help="example image size (default: config)")
    parser.add_argument(
        "--key_in_ckpt", default="", help="key of the network weights in the checkpoint, if any (default: detected)"
    )
    args, overrides = parser.parse_known_args(argv)

    config = ConfigParser()
    config.read_config(args.config_file)
    config.update(_parse_overrides(overrides))
    network = config.get_parsed_content("network_def")
    # weights_only=True; a checkpoint of another configuration raises one readable CheckpointMismatchError
    network = network.to(torch.device(args.device))
    load_network_weights(network, args.ckpt_file, map_location=args.device, key=args.key_in_ckpt or None)
    image_size = args.image_size or config.get("image_size", [224, 224])
    extra = {}
    if args.meta_file:
        with open(args.meta_file, encoding="utf-8") as handle:
            extra["metadata.json"] = json.dumps(json.load(handle))
    export_format = args.format or _SUFFIXES.get(os.path.splitext(args.filepath)[1].lower(), "torchscript")
    export_network(network, args.filepath, format=export_format, image_size=image_size, extra_files=extra)
    difference = check_export(
        network.eval(), load_exported(args.filepath, export_format, args.device), _export_inputs(network, image_size)
    )
    print(
        f"exported {args.ckpt_file} -> {args.filepath} ({export_format}, verified against the eager network: "
        f"max abs difference {difference:.2e} in the logits)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
