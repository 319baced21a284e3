"""RandFlipWithReportd: the mirror of the image and mask and the swap of the report's direction words go together."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from monai.bundle import ConfigParser
from monai.transforms import EnsureChannelFirstd, LoadImaged

from himix_monai.transforms import RandFlipWithReportd, TokenizeTextd, swap_direction_words
from himix_monai.transforms.flip import HORIZONTAL_WORDS, VERTICAL_WORDS

TRAIN_CONFIG = Path(__file__).resolve().parents[1] / "bundle" / "configs" / "train.json"


def test_swap_direction_words_keeps_case_and_whole_words():
    pairs = HORIZONTAL_WORDS + VERTICAL_WORDS
    text = "Left lung, upper zone; polyp in top right of the image, upright, LEFT."
    swapped = "Right lung, lower zone; polyp in bottom left of the image, upright, RIGHT."
    assert swap_direction_words(text, pairs) == swapped
    assert swap_direction_words(swap_direction_words(text, pairs), pairs) == text
    assert swap_direction_words("center of the image", HORIZONTAL_WORDS) == "center of the image"


def _picture_item(tmp_path):
    """A 12 x 16 picture whose lesion (and mask) fills the left quarter, with a report saying so."""
    rows, columns = 12, 16
    picture = np.zeros((rows, columns), dtype=np.uint8)
    picture[2:10, 0:4] = 200
    Image.fromarray(picture).save(tmp_path / "image.png")
    Image.fromarray((picture > 0).astype(np.uint8) * 255).save(tmp_path / "label.png")
    item = {"image": str(tmp_path / "image.png"), "label": str(tmp_path / "label.png")}
    item["text"] = "polyp located in left of the image"
    loaded = EnsureChannelFirstd(["image", "label"])(LoadImaged(["image", "label"], image_only=True)(item))
    return picture, loaded


def test_horizontal_flip_mirrors_the_picture_and_rewrites_the_report(tmp_path, tiny_text_model_dir):
    picture, item = _picture_item(tmp_path)
    tokenize = TokenizeTextd("text", tiny_text_model_dir, max_length=12)
    item = tokenize(item)
    flip = RandFlipWithReportd(["image", "label"], tokenize=tokenize, prob=1.0, spatial_axis=0)
    out = flip(item)

    # MONAI's picture layout is (column, row): back in display orientation the lesion is now on the right
    shown = np.asarray(out["image"][0]).T
    np.testing.assert_array_equal(shown, np.fliplr(picture).astype(shown.dtype))
    np.testing.assert_array_equal(np.asarray(out["label"][0]).T > 0, np.fliplr(picture) > 0)
    assert out["text"] == "polyp located in right of the image"
    expected_ids, expected_mask = tokenize.tokenize("polyp located in right of the image")
    assert out["input_ids"].tolist() == expected_ids.tolist() != item["input_ids"].tolist()
    assert out["attention_mask"].tolist() == expected_mask.tolist()


def test_no_flip_leaves_the_item_alone_and_the_draw_is_seeded(tmp_path, tiny_text_model_dir):
    _, item = _picture_item(tmp_path)
    item = TokenizeTextd("text", tiny_text_model_dir, max_length=12)(item)
    out = RandFlipWithReportd(["image", "label"], prob=0.0)(item)
    assert out["text"] == item["text"] and out["image"] is item["image"]

    draws = []
    for _ in range(2):
        flip = RandFlipWithReportd(["image", "label"], prob=0.5)
        flip.set_random_state(seed=3)
        draws.append([flip(item)["text"] for _ in range(8)])
    assert draws[0] == draws[1] and len(set(draws[0])) == 2


def test_bundle_flips_are_off_by_default_and_switch_on_by_key():
    parser = ConfigParser()
    parser.read_config(str(TRAIN_CONFIG))
    assert parser["flip_prob_horizontal"] == parser["flip_prob_vertical"] == 0.0
    augmentation = json.loads(TRAIN_CONFIG.read_text())["train"]["augmentation"]
    flips = [t for t in augmentation if "Flip" in t["_target_"]]
    assert [(t["prob"], t["spatial_axis"]) for t in flips] == [("@flip_prob_horizontal", 0), ("@flip_prob_vertical", 1)]
    parser["flip_prob_horizontal"] = 0.5
    flip = parser.get_parsed_content("train#augmentation")[-2]
    assert isinstance(flip, RandFlipWithReportd) and flip.prob == 0.5 and flip.tokenize is not None
    assert flip.word_pairs == HORIZONTAL_WORDS


def test_rejects_a_tokenize_that_is_not_tokenize_textd():
    with pytest.raises(TypeError, match="TokenizeTextd"):
        RandFlipWithReportd("image", tokenize=lambda text: text)
