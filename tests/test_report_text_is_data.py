"""Report texts from files are data: datalists, ``texts.csv`` and ``texts.json`` never reach the config parser.

A text that MONAI's parser would evaluate (``$...``), resolve (``@...``, ``%...``) or instantiate (a
``_target_`` object) is read from a training datalist, an evaluation datalist and an inference folder's text
sidecars; each reaches the tokenizer as the characters it is, and the marker file the ``$``-texts would create
never appears. (The MONAI Label request route is ``tests/test_monailabel_route.py``.)
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from monai.bundle import ConfigParser

from himix_monai.transforms import TokenizeTextd
from tests.hostile_text import hostile_texts

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
TRAIN, EVALUATE, INFERENCE = (str(CONFIGS / name) for name in ("train.json", "evaluate.json", "inference.json"))


def _cases(folder: Path, texts: list[str]) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    items = []
    for index, text in enumerate(texts):
        image, label = folder / f"case_{index:02d}.png", folder / f"case_{index:02d}_mask.png"
        Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(image)
        Image.fromarray((rng.random((32, 32)) > 0.5).astype(np.uint8) * 255).save(label)
        items.append({"image": str(image), "label": str(label), "text": text})
    return items


def _parser(files: list[str], **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(files)
    parser.update(overrides)
    return parser


def _assert_read_as_text(dataset, texts: list[str], tokenizer: str, marker: Path) -> None:
    tokenize = TokenizeTextd("text", tokenizer, max_length=24)
    assert len(dataset) == len(texts)
    for index, text in enumerate(texts):
        item = dataset[index]
        item = item[0] if isinstance(item, list) else item  # a cropping transform returns a list
        assert item["text"].strip() == text.strip()
        expected_ids, _ = tokenize.tokenize(text.strip())
        torch.testing.assert_close(item["input_ids"], expected_ids, rtol=0, atol=0)
    assert not marker.exists()


@pytest.mark.parametrize("split", ["training", "validation"])
def test_datalist_texts_are_data_in_training_and_evaluation(tmp_path, tiny_text_model_dir, split):
    marker = tmp_path / "marker"
    texts = hostile_texts(marker, Path(TRAIN))
    items = _cases(tmp_path / "data", texts)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": items, "validation": items, "test": items}))
    files = [TRAIN] if split == "training" else [TRAIN, EVALUATE]
    parser = _parser(
        files, use_demo_data=False, datalist=str(datalist), text_encoder=tiny_text_model_dir, num_workers=0
    )
    dataset = parser.get_parsed_content("train#dataset" if split == "training" else "validate#dataset")
    _assert_read_as_text(dataset, texts, tiny_text_model_dir, marker)


@pytest.mark.parametrize("sidecar", ["texts.csv", "texts.json"])
def test_sidecar_texts_are_data_in_inference(tmp_path, tiny_text_model_dir, sidecar):
    marker = tmp_path / "marker"
    texts = hostile_texts(marker, Path(INFERENCE))
    folder = tmp_path / "input"
    items = _cases(folder, texts)
    for item in items:
        Path(item["label"]).unlink()  # an inference folder holds images only
    names = [Path(item["image"]).name for item in items]
    if sidecar == "texts.csv":
        with open(folder / sidecar, "w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream)
            writer.writerow(["Image", "Description"])
            writer.writerows(zip(names, texts))
    else:
        (folder / sidecar).write_text(json.dumps(dict(zip(names, texts))), encoding="utf-8")
    parser = _parser(
        [INFERENCE], input_dir=str(folder), output_dir=str(tmp_path / "out"), text_encoder=tiny_text_model_dir
    )
    dataset = parser.get_parsed_content("dataset")
    _assert_read_as_text(dataset, texts, tiny_text_model_dir, marker)


def test_a_datalist_text_that_is_not_a_string_is_refused_by_name(tmp_path):
    from himix_monai.data.datalist import DatalistError, load_checked_datalist

    items = _cases(tmp_path / "data", ["one lesion."])
    items[0]["text"] = {"_target_": "pathlib.Path.touch", "self": str(tmp_path / "marker")}
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": items}))
    with pytest.raises(DatalistError, match=r"item 1 of 'training': 'text' must be a non-empty string"):
        load_checked_datalist(datalist, "training")
    assert not (tmp_path / "marker").exists()


def test_the_marker_shows_a_text_that_reached_the_parser(tmp_path):
    """Negative control: the same text handed to MONAI's parser as config runs, and the marker appears."""
    marker = tmp_path / "marker"
    parser = ConfigParser({"text": hostile_texts(marker, Path(TRAIN))[0]})
    parser.get_parsed_content("text")
    assert marker.exists()
