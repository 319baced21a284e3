"""Tests for himix_monai.mask_reports and the data_prep.reports command line tool."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from data_prep.reports import main as reports_main
from himix_monai.mask_reports import (
    NO_CHEST_FINDING,
    chest_report,
    count_word,
    describe_chest_findings,
    find_lesions,
    generic_report,
    lesion_position,
    lesion_size_word,
    read_mask,
    report_from_mask,
    resolve_min_size,
)


def _mask(shape=(90, 90), boxes=()):
    mask = np.zeros(shape, dtype=np.uint8)
    for top, bottom, left, right in boxes:
        mask[top:bottom, left:right] = 1
    return mask


def test_one_lesion_upper_right_of_patient():
    # image LEFT, top third = the patient's upper RIGHT lung (radiological convention)
    mask = _mask(boxes=[(5, 20, 10, 25)])
    assert chest_report(mask) == "Unilateral pulmonary infection, one infected area, upper right lung."


def test_bilateral_two_lesions():
    mask = _mask(boxes=[(5, 20, 60, 80), (70, 85, 10, 25)])
    assert chest_report(mask) == (
        "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."
    )


def test_zone_combinations_and_all():
    spans_left = _mask(boxes=[(2, 88, 60, 70)])  # all three zones of the patient's left lung
    assert chest_report(spans_left) == "Unilateral pulmonary infection, one infected area, all left lung."
    middle_lower = _mask(boxes=[(35, 50, 60, 70), (65, 80, 60, 70)])
    assert chest_report(middle_lower) == (
        "Unilateral pulmonary infection, two infected areas, middle lower left lung."
    )


def test_small_overlap_into_another_zone_is_ignored():
    mask = _mask(boxes=[(30, 58, 60, 70)])  # plus one row (< 10 %) in the upper third (rows 0-29)
    mask[29, 60:70] = 1
    assert describe_chest_findings(mask).zones == {"left": ("middle",), "right": ()}


def test_lung_mask_defines_zones_and_midline():
    lungs = _mask(boxes=[(30, 60, 20, 80)])  # lung field rows 30-59, midline at column 50
    mask = _mask(boxes=[(31, 38, 52, 58)])
    assert chest_report(mask) == "Unilateral pulmonary infection, one infected area, middle left lung."
    assert chest_report(mask, lung_mask=lungs) == "Unilateral pulmonary infection, one infected area, upper left lung."


def test_min_size_filtering_and_fraction():
    mask = _mask(boxes=[(5, 20, 10, 25), (70, 73, 70, 73)])  # 225 px and a 9 px speck
    assert chest_report(mask, min_size=10).startswith("Unilateral pulmonary infection, one infected area")
    assert chest_report(mask, min_size=1).startswith("Bilateral pulmonary infection, two infected areas")
    assert resolve_min_size(0.001, 8100) == 9
    assert len(find_lesions(mask, min_size=0.0012)) == 1  # 0.12 % of 8100 -> 10 px
    assert len(find_lesions(mask, min_size=0.001)) == 2
    with pytest.raises(ValueError):
        resolve_min_size(-1, 100)


def test_eight_connectivity_and_count_words():
    mask = _mask(boxes=[(10, 15, 10, 15), (15, 20, 15, 20)])  # touching at a corner
    assert len(find_lesions(mask, min_size=1)) == 1
    eleven = np.zeros((90, 90), np.uint8)
    for index in range(11):
        eleven[5 + 8 * index : 9 + 8 * index, 60:64] = 1
    assert ", 11 infected areas, all left lung." in chest_report(eleven, min_size=4)
    assert [count_word(n) for n in (1, 3, 10, 11)] == ["one", "three", "ten", "11"]


def test_empty_masks():
    empty = np.zeros((32, 32))
    assert chest_report(empty) == NO_CHEST_FINDING
    assert generic_report(empty) == "no polyp found in the image"


def test_masks_are_binarized_as_training_binarizes_them(tmp_path):
    """As ``BinarizeMask``: 0..255 masks above 127, probabilities above 0.5, every label of a label map, and a
    colour mask by any of its channels (a red lesion is a lesion, as in training)."""
    for background, lesion in ((100, 128), (0.4, 0.6), (0, 2)):
        mask = np.full((90, 90), background, np.float32)
        mask[5:20, 10:25] = lesion
        assert len(find_lesions(mask, min_size=10)) == 1, (background, lesion)
    red = np.zeros((90, 90, 3), np.uint8)
    red[5:20, 10:25, 0] = 255
    Image.fromarray(red).save(tmp_path / "red.png")
    assert chest_report(read_mask(tmp_path / "red.png")) == (
        "Unilateral pulmonary infection, one infected area, upper right lung."
    )


def test_generic_positions_and_sizes():
    assert lesion_position((50, 85), (100, 100)) == "right"
    assert lesion_position((10, 10), (100, 100)) == "top left"
    assert lesion_position((50, 50), (100, 100)) == "center"
    assert lesion_position((90, 50), (100, 100)) == "bottom"
    assert [lesion_size_word(f) for f in (0.01, 0.05, 0.149, 0.15, 0.6)] == [
        "small", "medium", "medium", "large", "large"
    ]
    small_right = _mask((100, 100), [(45, 55, 80, 90)])
    assert generic_report(small_right) == "one small polyp located in right of the image"
    two = _mask((100, 100), [(5, 15, 5, 15), (30, 70, 30, 70)])
    assert generic_report(two, noun="lesion") == (
        "two lesions, one large lesion located in center of the image "
        "and one small lesion located in top left of the image"
    )
    assert report_from_mask(small_right, style="generic") == generic_report(small_right)
    with pytest.raises(ValueError, match="unknown report style"):
        report_from_mask(small_right, style="kvasir")


def test_read_mask_formats(tmp_path):
    display = _mask(boxes=[(5, 20, 60, 80)])
    Image.fromarray(display * 255).save(tmp_path / "m.png")
    assert np.array_equal(read_mask(tmp_path / "m.png"), display.astype(bool))
    # NIfTI in MONAI layout (transposed) with a DICOM-derived axial affine (axis 0 -> patient left)
    affine = np.diag([-0.7, -0.7, 1.0, 1.0])
    nib.save(nib.Nifti1Image(display.T.copy(), affine), tmp_path / "m.nii.gz")
    assert np.array_equal(read_mask(tmp_path / "m.nii.gz"), display.astype(bool))
    # RAS-stored NIfTI (axis 0 -> patient right, axis 1 -> anterior): flipped into display orientation
    nib.save(nib.Nifti1Image(display.T[::-1, ::-1].copy(), np.diag([0.7, 0.7, 1.0, 1.0])), tmp_path / "r.nii.gz")
    assert np.array_equal(read_mask(tmp_path / "r.nii.gz"), display.astype(bool))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png"):
        read_mask(tmp_path / "bad.png")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), np.uint8), np.eye(4)), tmp_path / "vol.nii.gz")
    with pytest.raises(ValueError, match="vol.nii.gz"):
        read_mask(tmp_path / "vol.nii.gz")


def _small_datalist(tmp_path):
    masks = {"a": [(5, 20, 10, 25)], "b": [(5, 20, 60, 80), (70, 85, 10, 25)]}
    items = []
    for name, boxes in masks.items():
        Image.fromarray(_mask(boxes=boxes) * 255).save(tmp_path / f"mask_{name}.png")
        Image.fromarray(np.zeros((90, 90), np.uint8)).save(tmp_path / f"{name}.png")
        items.append({"image": str(tmp_path / f"{name}.png"), "label": str(tmp_path / f"mask_{name}.png"), "text": ""})
    items[1]["text"] = "kept"
    path = tmp_path / "in.json"
    path.write_text(json.dumps({"training": items[:1], "validation": items[1:], "test": []}))
    return path


def test_cli_fills_datalist(tmp_path, capsys):
    source = _small_datalist(tmp_path)
    assert reports_main(["--datalist", str(source), "--out", str(tmp_path / "out.json")]) == 0
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["training"][0]["text"] == "Unilateral pulmonary infection, one infected area, upper right lung."
    assert result["validation"][0]["text"] == "kept"
    assert "1 of 2 item texts" in capsys.readouterr().out
    assert reports_main(["--datalist", str(source), "--out", str(tmp_path / "out.json"), "--overwrite-text"]) == 0
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["validation"][0]["text"].startswith("Bilateral pulmonary infection, two infected areas")
    assert "2 of 2 item texts" in capsys.readouterr().out


def test_cli_masks_folder_csv_and_errors(tmp_path, capsys):
    _small_datalist(tmp_path)
    out = tmp_path / "text.csv"
    assert reports_main(["--masks", str(tmp_path), "--out", str(out), "--style", "generic", "--min-size", "5"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [row["Image"] for row in rows] == ["a.png", "b.png", "mask_a.png", "mask_b.png"]
    assert rows[2]["Description"] == "one small polyp located in top left of the image"
    assert "4 reports" in capsys.readouterr().out
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"training": [{"image": "a.png", "label": "missing_mask.png", "text": ""}]}))
    assert reports_main(["--datalist", str(broken), "--out", str(tmp_path / "o.json")]) == 1
    error = capsys.readouterr().err
    assert f"entry 1 of {broken} ('training: a.png'): missing mask: " in error and "missing_mask.png" in error
    assert "no usable item" in error and not (tmp_path / "o.json").exists()
