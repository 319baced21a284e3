"""Do the word maps point at the lesion the report names? Decoy demo cases (issue 16; measured, not CI).

A model trained on the decoy demo (``python -m monai.bundle run training --config_file bundle/configs/train.json
--demo_decoys true --bundle_root <run>``) is explained (:py:func:`himix_monai.explain.explain`) on held-out decoy
cases: the reported lesions are in the mask and in the report, 1-2 decoy lesions of the same appearance are in
neither. For each case:

- ``zone map``: the sum of the word maps of the zone words of the report (``upper``, ``middle``, ``lower``,
  ``left``, ``right``); ``named``: its mean over the reported lesions' pixels; ``decoy_max``: the largest mean
  over one decoy lesion's pixels. The case counts as "named lesion weighed most" when ``named > decoy_max``.
- for cases with one reported lesion: the report is rewritten to name one decoy's zone instead (the same
  sentence a report of that decoy would be) and explained again; "the map moved" when the zone map of the new
  report weighs that decoy more than the originally named lesion, and also more than it did under the
  original report; "shifted" when (new target - old lesion) grew, whatever the sign.
- control: the same comparison for the sum of the other words' maps (words naming no place).
- whether the model reads the report at all: the mean predicted probability on named and on decoy pixels
  under the original report, and on the decoy under the rewritten one.

Decoy pixels are found by synthesising each case with and without decoys (same anatomy, lesions and noise:
:py:func:`himix_monai.demo.slices.synthesize_chest_slice`) and taking the pixels that differ.

Usage::

    python benchmarks/explain_decoys.py --bundle_root /tmp/run --cases 102:160 --out benchmarks/results/x.json \
        --pictures bundle/docs
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
ZONE_WORDS = {"upper", "middle", "lower", "left", "right"}


def decoy_components(
    seed: int, index: int, size: int, lesion_mask: np.ndarray
) -> list[tuple[tuple[str, str], np.ndarray]]:
    """(cell, mask) of each decoy lesion, display orientation."""
    from himix_monai.demo.slices import synthesize_chest_slice
    from himix_monai.mask_reports import LUNG_ZONES

    with_decoys = synthesize_chest_slice(seed, index, size=size, decoys=True)
    without = synthesize_chest_slice(seed, index, size=size, decoys=False)
    if not np.array_equal(with_decoys.lesion_mask, lesion_mask):
        raise RuntimeError(f"case {index}: the resynthesised lesion mask differs from the datalist's label")
    diff = (np.abs(with_decoys.hu.astype(np.int32) - without.hu.astype(np.int32)) > 20) & (lesion_mask == 0)
    labels, count = ndimage.label(diff)
    components = [labels == k for k in range(1, count + 1)]
    components = [c for c in components if c.sum() >= 4]
    cells = list(with_decoys.decoy_cells)
    if len(components) != len(cells):
        return []
    # match components to cells: side by image half (image left = patient right), zone by row order
    def key_component(c: np.ndarray) -> tuple[str, float]:
        rows, cols = np.nonzero(c)
        return ("right" if cols.mean() < size / 2 else "left", rows.mean())

    comps = sorted(components, key=key_component)
    cells_sorted = sorted(cells, key=lambda cell: (cell[0], LUNG_ZONES.index(cell[1])))
    if [key_component(c)[0] for c in comps] != [cell[0] for cell in cells_sorted]:
        return []
    return list(zip(cells_sorted, comps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle_root", required=True, help="bundle root of a model trained with --demo_decoys true")
    parser.add_argument("--cases", default="102:160", help="case indices start:stop of the decoy demo (seed 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--out", default=None, help="JSON results file")
    parser.add_argument("--pictures", default=None, help="folder for the two example PNGs")
    args = parser.parse_args()

    from monai.bundle import ConfigParser
    from monai.transforms import Compose, LoadImaged, EnsureChannelFirstd

    from himix_monai.demo.slices import generate_demo_dataset
    from himix_monai.mask_reports import ChestFindings, format_chest_report
    from himix_monai.explain import explain, render_word_maps
    from himix_monai.networks.blocks.text_encoder import load_text_tokenizer

    torch.set_num_threads(1)
    start, stop = (int(v) for v in args.cases.split(":"))
    root = Path(args.bundle_root)
    data_dir = root / "explain_decoys_data"
    datalist_path = data_dir / "datalist.json"
    if not datalist_path.exists():
        generate_demo_dataset(data_dir, num=stop, seed=args.seed, size=args.size, decoys=True)
    datalist = json.loads(datalist_path.read_text())
    items = datalist["training"] + datalist["validation"] + datalist["test"]

    config = ConfigParser()
    config.read_config(str(REPO / "bundle" / "configs" / "inference.json"))
    config.update({"bundle_root": str(root)})
    network = config.get_parsed_content("network_def", instantiate=True)
    checkpoint = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(checkpoint.get("model", checkpoint))
    network.eval()
    preprocessing = config.get_parsed_content("preprocessing", instantiate=True)
    tokenize = preprocessing.transforms[0]
    tokenizer = load_text_tokenizer(config.get_parsed_content("text_encoder"))
    load_label = Compose([LoadImaged("label", image_only=True), EnsureChannelFirstd("label")])

    def run(image: torch.Tensor, text: str):
        ids, mask = tokenize.tokenize(text, source="text")
        return explain(network, image, ids, mask, tokenizer, text, word_stages=False)

    def zone_map(maps, zone: bool = True) -> np.ndarray:
        picked = [m for w, m in zip(maps.words, maps.word_maps) if (w.lower() in ZONE_WORDS) == zone]
        return np.sum(picked, axis=0) if picked else np.zeros_like(maps.logits)

    rows, examples = [], []
    began = time.time()
    for index in range(start, stop):
        item = items[index]
        data = preprocessing({"image": item["image"], "text": item["text"]})
        label = load_label({"label": item["label"]})["label"][0].numpy() > 0  # MONAI layout (column, row)
        named = label
        decoys = [
            (cell, comp.T) for cell, comp in decoy_components(args.seed, index, args.size, label.T.astype(np.uint8))
        ]
        if not decoys:
            continue
        image = data["image"]
        maps = run(image, item["text"])
        zones = zone_map(maps)
        prob = 1 / (1 + np.exp(-maps.logits))
        row = {
            "case": index, "text": item["text"], "decoys": [list(c) for c, _ in decoys],
            "named": float(zones[named].mean()), "decoy_means": [float(zones[m].mean()) for _, m in decoys],
            "report_named": float(maps.report_map[named].mean()),
            "report_decoy_max": max(float(maps.report_map[m].mean()) for _, m in decoys),
            "prob_named": float(prob[named].mean()), "prob_decoy_max": max(float(prob[m].mean()) for _, m in decoys),
        }  # fmt: skip
        row["named_weighs_most"] = row["named"] > max(row["decoy_means"])
        others = zone_map(maps, zone=False)  # control: the words that name no place
        row["other_words_named_weighs_most"] = float(others[named].mean()) > max(
            float(others[m].mean()) for _, m in decoys
        )
        if "one infected area" in item["text"]:
            cell, target = decoys[0]
            swapped_text = format_chest_report(ChestFindings(1, {cell[0]: (cell[1],)}))
            swapped = run(image, swapped_text)
            swapped_zones = zone_map(swapped)
            row.update({
                "swapped_text": swapped_text,
                "swapped_target": float(swapped_zones[target].mean()),
                "swapped_named": float(swapped_zones[named].mean()),
                "prob_target_swapped": float((1 / (1 + np.exp(-swapped.logits)))[target].mean()),
            })  # fmt: skip
            # towards the newly named decoy, relative to the formerly named lesion, compared with before
            row["shift"] = (row["swapped_target"] - row["swapped_named"]) - (row["decoy_means"][0] - row["named"])
            row["moved"] = (
                row["swapped_target"] > row["swapped_named"] and row["swapped_target"] > row["decoy_means"][0]
            )
            # the example pictures: the rewritten case with the clearest effect (largest margin + shift)
            margin = row["named"] - max(row["decoy_means"]) + row["shift"]
            if not examples or margin > examples[0][0]:
                examples[:] = [(margin, index, image, maps, swapped)]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("text", "swapped_text")}), flush=True)

    swap_rows = [r for r in rows if "moved" in r]
    summary = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{_cpu_name()}, {torch.get_num_threads()} thread(s)",
        "command": " ".join(["python", *sys.argv]),
        "bundle_root": str(root),
        "cases": len(rows),
        "named_weighs_most": sum(r["named_weighs_most"] for r in rows),
        "report_map_named_weighs_most": sum(r["report_named"] > r["report_decoy_max"] for r in rows),
        "other_words_named_weighs_most": sum(r["other_words_named_weighs_most"] for r in rows),
        "swap_cases": len(swap_rows),
        "moved": sum(r["moved"] for r in swap_rows),
        "shifted_towards_new_zone": sum(r["shift"] > 0 for r in swap_rows),
        "median_shift": float(np.median([r["shift"] for r in swap_rows])) if swap_rows else None,
        "mean_prob_named": float(np.mean([r["prob_named"] for r in rows])) if rows else None,
        "mean_prob_decoy_max": float(np.mean([r["prob_decoy_max"] for r in rows])) if rows else None,
        "mean_prob_target_after_swap": (
            float(np.mean([r["prob_target_swapped"] for r in swap_rows])) if swap_rows else None
        ),
        "seconds": round(time.time() - began, 1),
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"summary": summary, "cases": rows}, indent=1) + "\n")
    if args.pictures and examples:
        from PIL import Image

        _, index, image, maps, swapped = examples[0]
        folder = Path(args.pictures)
        for name, m in (("explain_decoy_report.png", maps), ("explain_decoy_zone_changed.png", swapped)):
            rgb = render_word_maps(image.numpy().transpose(0, 2, 1), _transposed(m), columns=7, include_stages=False)
            picture = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=96)  # small for the repository
            picture.save(folder / name, optimize=True)
        summary["example_case"] = index
        print(f"example pictures: case {index}, in {folder}")
        if args.out:
            Path(args.out).write_text(json.dumps({"summary": summary, "cases": rows}, indent=1) + "\n")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _transposed(maps):
    """The maps in display orientation (rows, columns) for a picture; MONAI's NIfTI layout is (column, row)."""
    from dataclasses import replace

    return replace(
        maps,
        word_maps=maps.word_maps.transpose(0, 2, 1),
        stage_maps=maps.stage_maps.transpose(0, 2, 1),
        word_stage_maps=maps.word_stage_maps.transpose(0, 1, 3, 2),
        report_map=maps.report_map.T,
        logits=maps.logits.T,
        mask=maps.mask.T,
    )


if __name__ == "__main__":
    main()
