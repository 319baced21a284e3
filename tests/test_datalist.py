"""Tests of himix_monai.data.datalist: writing, loading, skip reports, file checks and name resolution."""

from __future__ import annotations

import argparse
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_prep._cli import CandidateItem, build_datalist
from himix_monai.data.datalist import DatalistError, load_datalist, validate_datalist, write_datalist
from himix_monai.data.file_matching import DirectoryIndex, find_image_file, find_mask_file
from himix_monai.data.image_checks import check_image_label_pair, read_spatial_size
from himix_monai.data.sheets import read_description_sheet
from himix_monai.data.skip_report import SkipReason, SkipReport
from himix_monai.errors import UnreadableImageError
from himix_monai.files import split_image_extension


def save_image(path: Path, height: int = 16, width: int = 16, channels: int = 3) -> Path:
    """Write a small random image; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (height, width, channels) if channels > 1 else (height, width)
    pixels = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def truncate_file(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def item(tmp_path: Path, name: str, text: str = "a lesion") -> dict:
    return {"image": str(tmp_path / f"{name}.png"), "label": str(tmp_path / f"mask_{name}.png"), "text": text}


# ---------------------------------------------------------------- write / load


def test_write_then_load_every_split(tmp_path):
    datalist = {
        "training": [item(tmp_path, "a"), item(tmp_path, "b")],
        "validation": [item(tmp_path, "c")],
        "test": [item(tmp_path, "d", "bilateral infection")],
    }
    out = write_datalist(datalist, tmp_path / "sub" / "datalist.json")
    assert out == (tmp_path / "sub" / "datalist.json").absolute()
    assert json.loads(out.read_text()) == datalist
    assert load_datalist(out, "training") == datalist["training"]
    assert load_datalist(out, "validation") == datalist["validation"]
    assert load_datalist(out, "test") == datalist["test"]
    # readable by MONAI directly
    from monai.data import load_decathlon_datalist

    assert load_decathlon_datalist(out, data_list_key="training") == datalist["training"]


def test_load_resolves_relative_paths_and_keeps_text(tmp_path):
    (tmp_path / "polyp").write_text("a file whose name is also the text")
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": [{"image": "img/a.png", "label": "gt/a.png", "text": "polyp"}]}))
    (loaded,) = load_datalist(path, "training")
    assert loaded["image"] == os.path.normpath(tmp_path / "img/a.png")
    assert loaded["label"] == os.path.normpath(tmp_path / "gt/a.png")
    assert loaded["text"] == "polyp"  # MONAI alone would have turned it into a path
    (loaded,) = load_datalist(path, "training", base_dir="/data")
    assert loaded["image"] == "/data/img/a.png"


def test_load_empty_split(tmp_path):
    path = write_datalist({"training": [item(tmp_path, "a")], "validation": [], "test": []}, tmp_path / "d.json")
    assert load_datalist(path, "test") == []
    assert load_datalist(path, "validation") == []


def test_load_invalid_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"training": [')
    with pytest.raises(DatalistError, match=r"broken\.json.*not valid JSON.*line 1"):
        load_datalist(path)


def test_load_missing_key_names_file_and_key(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"training": []}))
    with pytest.raises(DatalistError, match=r"d\.json.*lacks the split 'validation'.*'training'"):
        load_datalist(path, "validation")


@pytest.mark.parametrize("missing", ["image", "label", "text"])
def test_load_item_lacking_a_key(tmp_path, missing):
    entry = item(tmp_path, "a")
    del entry[missing]
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"training": [item(tmp_path, "b"), entry]}))
    with pytest.raises(DatalistError, match=rf"d\.json: item 2 of 'training' lacks '{missing}'"):
        load_datalist(path)


def test_load_missing_file_and_non_object(tmp_path):
    with pytest.raises(DatalistError, match=r"nothere\.json: datalist file not found"):
        load_datalist(tmp_path / "nothere.json")
    path = tmp_path / "list.json"
    path.write_text("[]")
    with pytest.raises(DatalistError, match=r"list\.json: a datalist must be a JSON object"):
        load_datalist(path)


@pytest.mark.parametrize(
    "datalist, message",
    [
        ([], "must be a JSON object"),
        ({"name": "x"}, "lacks all of the keys"),
        ({"training": {}}, "'training' is a dict"),
        ({"training": ["a.png"]}, "item 1 of 'training' is a str"),
        ({"training": [{"image": "a.png", "label": "b.png"}]}, "lacks 'text'"),
        ({"test": [{"image": "a.png", "label": "b.png", "text": "  "}]}, "'text' must be a non-empty string"),
        ({"training": [{"image": "", "label": "b.png", "text": "t"}]}, "'image' must be a non-empty path"),
    ],
)
def test_validate_datalist_rejects(datalist, message):
    with pytest.raises(DatalistError, match=message):
        validate_datalist(datalist)


def test_invalid_datalist_is_not_written_and_old_file_kept(tmp_path):
    path = tmp_path / "d.json"
    old = write_datalist({"training": [item(tmp_path, "old")]}, path).read_text()
    with pytest.raises(DatalistError):
        write_datalist({"training": [{"image": "a.png"}]}, path)
    assert path.read_text() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json"]


def test_crash_while_writing_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "d.json"
    old = write_datalist({"training": [item(tmp_path, "old")]}, path).read_text()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_datalist({"training": [item(tmp_path, "new")]}, path)
    assert path.read_text() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json"]  # no temporary file left


# ---------------------------------------------------------------- skip report


def test_skip_report_counts_and_summary(caplog):
    report = SkipReport()
    assert report.summary() == "skipped 0"
    report.skip("a.png", SkipReason.EMPTY_DESCRIPTION, "/d/Train_text.xlsx", 2)
    report.skip("b.png", SkipReason.MISSING_MASK, "/d/Train_text.xlsx", 3, "no 'b.png' in /d/labelcol")
    report.skip("c.png", SkipReason.MISSING_MASK, "/d/Train_text.xlsx", 4)
    report.skip("d.jpg", SkipReason.DUPLICATE_ID, "/d/anns/train.json", 7, unit="entry")
    assert len(report) == 4
    assert report.counts_by_reason() == {"missing mask": 2, "empty description": 1, "duplicate id": 1}
    assert report.summary() == "skipped 4 (missing mask: 2, empty description: 1, duplicate id: 1)"
    assert report.items[1].message() == "row 3 of /d/Train_text.xlsx ('b.png'): missing mask: no 'b.png' in /d/labelcol"
    assert report.items[3].location == "entry 7 of /d/anns/train.json"
    assert "row 2 of /d/Train_text.xlsx ('a.png'): empty description" in caplog.text


def test_skip_report_strict_raises_with_file_row_reason():
    report = SkipReport(strict=True)
    with pytest.raises(DatalistError, match=r"row 5 of /d/Test_text\.csv \('x\.png'\): missing image"):
        report.skip("x.png", SkipReason.MISSING_IMAGE, "/d/Test_text.csv", 5)
    assert isinstance(DatalistError("x"), ValueError)


def test_skip_report_notes():
    report = SkipReport()
    report.add_note("ext", "resolved {count} extension mismatches", "sheet 'a.png' -> 'a.tif'")
    report.add_note("ext", "resolved {count} extension mismatches", "sheet 'b.png' -> 'b.tif'")
    report.add_note("val", "took {a} rows from {b}")
    assert report.notes() == [
        "resolved 2 extension mismatches, e.g. sheet 'a.png' -> 'a.tif'",
        "took {a} rows from {b}",  # braces in a summary are kept as written
    ]
    assert len(report) == 0


# ---------------------------------------------------------------- file checks


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif", ".bmp"])
def test_read_spatial_size_2d_formats(tmp_path, suffix):
    assert read_spatial_size(save_image(tmp_path / f"a{suffix}", 12, 20)) == (12, 20)
    assert read_spatial_size(save_image(tmp_path / f"g{suffix}", 12, 20, channels=1)) == (12, 20)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_truncated_image_is_unreadable(tmp_path, suffix):
    path = save_image(tmp_path / f"a{suffix}", 64, 64)
    truncate_file(path)
    with pytest.raises(UnreadableImageError, match=path.name):
        read_spatial_size(path)
    assert read_spatial_size(path, verify=False) == (64, 64)  # the header alone looks fine


def test_png_cut_in_its_last_chunk_is_unreadable(tmp_path):
    path = save_image(tmp_path / "a.png")
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(UnreadableImageError, match="truncated PNG"):
        read_spatial_size(path)


def test_garbage_file_is_unreadable(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(b"not an image at all")
    with pytest.raises(UnreadableImageError):
        read_spatial_size(path)


def test_read_spatial_size_nifti(tmp_path):
    import nibabel

    data = np.zeros((10, 12, 5), dtype=np.float32)
    nibabel.save(nibabel.Nifti1Image(data, np.eye(4)), tmp_path / "a.nii.gz")
    nibabel.save(nibabel.Nifti1Image(data[..., :1], np.eye(4)), tmp_path / "b.nii")
    assert read_spatial_size(tmp_path / "a.nii.gz") == (10, 12, 5)
    assert read_spatial_size(tmp_path / "b.nii") == (10, 12)
    raw = gzip.decompress((tmp_path / "a.nii.gz").read_bytes())
    (tmp_path / "c.nii.gz").write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(UnreadableImageError):
        read_spatial_size(tmp_path / "c.nii.gz")


def test_read_spatial_size_dicom(tmp_path):
    pydicom_data = pytest.importorskip("pydicom.data")
    source = Path(pydicom_data.get_testdata_file("CT_small.dcm"))
    import pydicom

    dataset = pydicom.dcmread(source)
    assert read_spatial_size(source) == (int(dataset.Rows), int(dataset.Columns))
    copy = tmp_path / "ct.dcm"
    copy.write_bytes(source.read_bytes()[:-1000])
    with pytest.raises(UnreadableImageError):
        read_spatial_size(copy)


def test_check_pair(tmp_path):
    image = save_image(tmp_path / "a.png", 16, 16)
    assert check_image_label_pair(image, save_image(tmp_path / "m.png", 16, 16, channels=1)) is None
    assert check_image_label_pair(image, save_image(tmp_path / "m3.png", 16, 16, channels=3)) is None
    problem = check_image_label_pair(image, save_image(tmp_path / "small.png", 8, 16, channels=1))
    assert problem.reason == SkipReason.SIZE_MISMATCH and "16x16" in problem.detail and "8x16" in problem.detail
    assert check_image_label_pair(tmp_path / "no.png", image).reason == SkipReason.MISSING_IMAGE
    assert check_image_label_pair(image, tmp_path / "no.png").reason == SkipReason.MISSING_MASK
    broken = save_image(tmp_path / "broken.png", 32, 32)
    truncate_file(broken)
    assert check_image_label_pair(broken, image).reason == SkipReason.UNREADABLE_IMAGE
    assert check_image_label_pair(image, broken).reason == SkipReason.UNREADABLE_MASK


def test_build_datalist_keeps_order_and_reports(tmp_path):
    sheet = tmp_path / "Train_text.xlsx"
    candidates = []
    for number, name in enumerate("abcde"):
        image = save_image(tmp_path / f"{name}.png")
        mask = save_image(tmp_path / f"mask_{name}.png", channels=1)
        split = "test" if name == "e" else "training"
        candidates.append(CandidateItem(split, f"{name}.png", image, mask, f"text {name}", sheet, number + 2))
    (tmp_path / "mask_c.png").unlink()
    report = SkipReport()
    args = argparse.Namespace(verify=True, workers=2)
    datalist = build_datalist(candidates, args, report, lambda checks, total, description: checks)
    assert [Path(i["image"]).name for i in datalist["training"]] == ["a.png", "b.png", "d.png"]
    assert [i["text"] for i in datalist["test"]] == ["text e"]
    assert datalist["validation"] == []
    assert [(s.item_id, s.reason, s.row) for s in report.items] == [("c.png", "missing mask", 4)]
    with pytest.raises(DatalistError, match=r"row 4 of .*Train_text\.xlsx \('c\.png'\): missing mask"):
        build_datalist(candidates, args, SkipReport(strict=True), lambda checks, total, description: checks)


# ---------------------------------------------------------------- names and sheets


def test_split_image_extension():
    assert split_image_extension("a.nii.gz") == ("a", ".nii.gz")
    assert split_image_extension("a.b.PNG") == ("a.b", ".PNG")
    assert split_image_extension("README") == ("README", "")


def test_directory_index_resolves_extension_mismatch(tmp_path):
    for name in ("a.tif", "b.png", "b.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    index = DirectoryIndex(tmp_path)
    assert index.find("b.png") == (tmp_path / "b.png", "b.png", False)
    assert index.find("a.png") == (tmp_path / "a.tif", "a.png", True)
    assert index.find("b.bmp").path.name == "b.png"  # preferred extension when several share the stem
    assert index.find("notes.png") is None
    assert index.image_names() == ["a.tif", "b.jpg", "b.png"]
    assert DirectoryIndex(tmp_path / "missing").names == frozenset()


def test_mask_prefix_handling(tmp_path):
    images, masks = tmp_path / "Images", tmp_path / "GTs"
    images.mkdir(), masks.mkdir()
    for name in ("covid_1.png", "plain.png"):
        (images / name).write_bytes(b"")
    for name in ("mask_covid_1.png", "plain.png"):
        (masks / name).write_bytes(b"")
    image_index, mask_index = DirectoryIndex(images), DirectoryIndex(masks)
    # HiMix style: the sheet names the image
    assert find_image_file(image_index, "covid_1.png").path.name == "covid_1.png"
    assert find_mask_file(mask_index, "covid_1.png", "covid_1.png").path.name == "mask_covid_1.png"
    # GuideDecoder style: the sheet names the mask
    assert find_image_file(image_index, "mask_covid_1.png").path.name == "covid_1.png"
    assert find_mask_file(mask_index, "mask_covid_1.png", "covid_1.png").path.name == "mask_covid_1.png"
    # MosMedData+ style: same name
    assert find_mask_file(mask_index, "plain.png", "plain.png").path.name == "plain.png"
    assert find_image_file(image_index, "nothere.png") is None
    assert find_mask_file(mask_index, "covid_2.png", "covid_2.png") is None


@pytest.mark.parametrize("suffix", [".xlsx", ".csv"])
def test_read_description_sheet(tmp_path, suffix):
    table = pd.DataFrame(
        {"Image": ["a.png", "b.png", "c.png", "d.png"], "Description": ["Left lung.", None, "   ", " Both lungs. "]}
    )
    path = tmp_path / f"Train_text{suffix}"
    table.to_excel(path, index=False) if suffix == ".xlsx" else table.to_csv(path, index=False)
    rows = read_description_sheet(path)
    assert [(r.row, r.image, r.description) for r in rows] == [
        (2, "a.png", "Left lung."),
        (3, "b.png", ""),
        (4, "c.png", ""),
        (5, "d.png", "Both lungs."),
    ]


def test_read_description_sheet_errors(tmp_path):
    path = tmp_path / "Train_text.csv"
    pd.DataFrame({"Image": ["a.png"], "Text": ["t"]}).to_csv(path, index=False)
    with pytest.raises(DatalistError, match=r"Train_text\.csv: lacks the column\(s\) 'Description'.*'Text'"):
        read_description_sheet(path)
    broken = tmp_path / "Train_text.xlsx"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DatalistError, match=r"Train_text\.xlsx: cannot read the sheet"):
        read_description_sheet(broken)
