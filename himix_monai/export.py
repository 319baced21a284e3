"""Export a trained HiMix network to TorchScript by tracing, with a check against the eager output.

``python -m monai.bundle ckpt_export`` scripts the network (``torch.jit.script``), which cannot compile the
Hugging Face text encoder, and its tracing mode takes a single input. HiMix is therefore traced with its three
inputs (image, token ids, attention mask) through MONAI's ``convert_to_torchscript(use_trace=True)``, which also
verifies that the traced module reproduces the eager one. The traced module accepts any batch size and any
image size divisible by 32; the number of tokens is fixed to the network's ``text_length``. ONNX export through
``monai.networks.utils.convert_to_onnx`` does not work yet: the exporter cannot translate the real FFTs of ASRM.

Command line::

    python -m himix_monai.export --config_file bundle/configs/inference.json \\
        --ckpt_file bundle/models/model.pt --filepath bundle/models/model.ts
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from collections.abc import Sequence

import torch
from monai.networks.utils import convert_to_torchscript

from himix_monai.checkpoints import load_network_weights
from himix_monai.networks.nets.himix import HiMix

__all__ = ["export_torchscript", "example_inputs", "main"]


def example_inputs(
    network: HiMix, image_size: Sequence[int] = (224, 224), in_channels: int | None = None, batch_size: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random example inputs for tracing: an image and ``text_length`` tokens of which the last few are padding."""
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
    image_size: Sequence[int] = (224, 224),
    extra_files: dict[str, str] | None = None,
    verify: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-4,
) -> torch.jit.ScriptModule:
    """Trace ``network`` with (image, input_ids, attention_mask) and save it; verify against the eager output.

    Args:
        network: a HiMix network (its text-encoder cache is disabled for tracing).
        filepath: output ``.ts`` file.
        image_size: spatial size of the example image (any size divisible by 32 works afterwards).
        extra_files: text files stored inside the TorchScript archive (e.g. the bundle's metadata).
        verify: compare the traced and eager outputs on the example inputs (MONAI's check).
        rtol: relative tolerance of the check.
        atol: absolute tolerance of the check.
    """
    network = network.eval()
    cache_size = network.text_encoder.cache_size if network.text_encoder is not None else 0
    if network.text_encoder is not None:
        network.text_encoder.cache_size = 0
    try:
        inputs = list(example_inputs(network, image_size, _stem_channels(network)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python branches
            traced = convert_to_torchscript(
                network,
                filename_or_obj=filepath,
                extra_files={k: v.encode() for k, v in (extra_files or {}).items()},
                verify=verify,
                inputs=inputs,
                use_trace=True,
                rtol=rtol,
                atol=atol,
            )
    finally:
        if network.text_encoder is not None:
            network.text_encoder.cache_size = cache_size
    return traced


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
    keys, shapes and recorded settings compared first, one readable error when they do not fit).
    """
    from monai.bundle import ConfigParser

    parser = argparse.ArgumentParser(prog="python -m himix_monai.export", description=__doc__.split("\n")[0])
    parser.add_argument("--config_file", required=True, help="bundle config defining network_def")
    parser.add_argument("--ckpt_file", required=True, help="checkpoint with the network weights (models/model.pt)")
    parser.add_argument("--filepath", required=True, help="output TorchScript file")
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
    load_network_weights(network, args.ckpt_file, map_location="cpu", key=args.key_in_ckpt or None)
    image_size = args.image_size or config.get("image_size", [224, 224])
    extra = {}
    if args.meta_file:
        with open(args.meta_file, encoding="utf-8") as handle:
            extra["metadata.json"] = json.dumps(json.load(handle))
    export_torchscript(network, args.filepath, image_size=image_size, extra_files=extra)
    print(f"exported {args.ckpt_file} -> {args.filepath} (traced, verified against the eager network)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
