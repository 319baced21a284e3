"""Export a trained HiMix network, checked against the eager network: the one place for every export format.

Formats (``FORMATS``): ``torchscript`` today; a new format is one function ``export_<format>(network, filepath,
inputs, extra_files, verify, rtol, atol)`` registered in ``_EXPORTERS``.

TorchScript: the network is compiled with ``torch.jit.script``, as ``python -m monai.bundle ckpt_export`` (the
model zoo's TorchScript check) does by default. ``torch.jit.script`` cannot compile a Hugging Face model, so the
frozen text encoder is traced (``torch.jit.trace``) inside the scripted network, see
:py:class:`~himix_monai.networks.blocks.text_encoder.ScriptableTextEncoder`; the rest of HiMix is scripted. The
exported module takes ``(image, input_ids, attention_mask)`` with any batch size, any image size divisible by 32
and up to ``text_length`` tokens, the text arguments optional (image-only decoding, as the eager network). It
is checked against the eager network with MONAI's ``convert_to_torchscript(verify=True)`` on an image and a
tokenised report with padding. ONNX export through ``monai.networks.utils.convert_to_onnx`` does not work yet:
the exporter cannot translate the real FFTs of ASRM.

Command line::

    python -m himix_monai.export --config_file bundle/configs/inference.json \\
        --ckpt_file bundle/models/model.pt --filepath bundle/models/model.ts [--format torchscript] [--device cuda:0]

Export on the device that will run the file (``--device``): the traced text encoder keeps the device of its
tracing example as a constant, so a file exported on the CPU runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.networks.utils import convert_to_torchscript

from himix_monai.checkpoints import load_network_weights
from himix_monai.networks.nets.himix import HiMix

__all__ = ["FORMATS", "export_network", "export_torchscript", "example_inputs", "main"]


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


_EXPORTERS: dict[str, Callable[..., Any]] = {"torchscript": export_torchscript}
FORMATS: tuple[str, ...] = tuple(_EXPORTERS)


def export_network(
    network: HiMix,
    filepath: str | os.PathLike,
    format: str = "torchscript",  # noqa: A002 (the option's name)
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
        format: one of :data:`FORMATS`.
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
    if format not in _EXPORTERS:
        raise ValueError(f"export format must be one of {list(FORMATS)}, got {format!r}.")
    network = network.eval()
    device = next(network.parameters()).device  # the exported module runs on the device it was exported on
    inputs = [t.to(device) for t in example_inputs(network, image_size, _stem_channels(network), batch_size=2)]
    return _EXPORTERS[format](network, filepath, inputs, extra_files, verify, rtol, atol)


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
    parser.add_argument("--filepath", required=True, help="output file (models/model.ts)")
    parser.add_argument("--format", default="torchscript", choices=FORMATS, help="export format")
    parser.add_argument(
        "--device", default="cpu", help="device to export on and for (e.g. cuda:0); the text encoder's trace "
        "fixes device constants, so export on the device type that will run the file"
    )
    parser.add_argument("--meta_file", default=None, help="metadata.json to store in the archive")
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
    export_network(network, args.filepath, format=args.format, image_size=image_size, extra_files=extra)
    print(f"exported {args.ckpt_file} -> {args.filepath} ({args.format}, verified against the eager network)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
