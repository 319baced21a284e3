"""Tests of himix_monai.data.inference_items (inference item lists, which inputs are volumes) and
himix_monai.transforms.ToPictureLayoutd (picture layout of 2-D predictions)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from monai.data import MetaTensor

from himix_monai.demo.slices import write_ct_dicom
from himix_monai.data.inference_items import InferenceInputError, build_inference_items, is_volume, read_text_sidecar
from himix_monai.transforms import ToPictureLayoutd

TEXT_A = "Unilateral pulmonary infection, one infected area, upper left lung."
TEXT_B = "Bilateral pulmonary infection, two infected areas, all left lung and all right lung."


def _png(path: Path, size=(20, 30)) -> Path:
    Image.fromarray(np.zeros(size, dtype=np.uint8)).save(path)
    return path


def _nifti(path: Path, shape, affine=None) -> Path:
    data = np.arange(int(np.prod(shape)), dtype=np.int16).reshape(shape) - 1000
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def _series(folder: Path, num: int = 3, size: int = 16) -> Path:
    """A DICOM series of ``num`` slices 2 mm apart, written in reverse file-name order."""
    import pydicom

    folder.mkdir(parents=True)
    for k in range(num):
        hu = np.full((size, size), -800 + 100 * k, dtype=np.int16)
        path = folder / f"s{num - k}.dcm"
        write_ct_dicom(hu, path, seed=0, name="series", pixel_spacing=1.0)
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.3.{k + 1}"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, 10.0 + 2.0 * k]
        ds.save_as(path)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# datalist input


def test_datalist_relative_paths_text_and_extra_keys(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    datalist = tmp_path / "datalist.json"
    datalist.write_text(
        json.dumps(
            {
                "training": [],
                "test": [
                    {"image": "a.png", "label": "mask_a.png", "text": f"  {TEXT_A} "},
                    {"image": str(tmp_path / "b.png"), "text": TEXT_B},
                ],
            }
        )
    )
    items = build_inference_items(input_datalist=datalist)
    assert items == [
        {"image": str((tmp_path / "a.png").resolve()), "text": TEXT_A},
        {"image": str((tmp_path / "b.png").resolve()), "text": TEXT_B},
    ]


def test_datalist_missing_text_names_item_and_image(tmp_path):
    _png(tmp_path / "a.png")
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"test": [{"image": "a.png"}]}))
    with pytest.raises(InferenceInputError, match=r"item 1 of 'test' in .*list\.json: no text for image .*a\.png"):
        build_inference_items(input_datalist=datalist)
    assert build_inference_items(input_datalist=datalist, default_text=TEXT_A)[0]["text"] == TEXT_A


@pytest.mark.parametrize(
    "content, split, message",
    [
        ({"test": [{"image": "missing.png", "text": "x"}]}, "test", r"item 1 of 'test' .*: image .*missing\.png not found"),
        ({"training": []}, "test", r"lacks the split 'test' \(found: 'training'\)"),
        ({"test": []}, "test", r"the split 'test' has no items"),
        ({"test": [{"label": "a.png"}]}, "test", r"item 1 .* non-empty 'image' path"),
        ([1, 2], "test", r"must be a JSON object"),
    ],
)
def test_datalist_errors(tmp_path, content, split, message):
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(content))
    with pytest.raises(InferenceInputError, match=message):
        build_inference_items(input_datalist=datalist, split=split)


def test_exactly_one_input(tmp_path):
    with pytest.raises(InferenceInputError, match="exactly one of input_datalist"):
        build_inference_items()
    with pytest.raises(InferenceInputError, match="exactly one of input_datalist"):
        build_inference_items(input_datalist=tmp_path / "d.json", input_dir=tmp_path)
    with pytest.raises(InferenceInputError, match=r"d\.json: datalist file not found"):
        build_inference_items(input_datalist=tmp_path / "d.json")


# ----------------------------------------------------------------------------------------------------------------
# folder input


def test_folder_with_texts_csv(tmp_path):
    _png(tmp_path / "covid_1.png")
    _png(tmp_path / "case_2.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "texts.csv").write_text(
        f'Image,Description\nmask_covid_1.png,"{TEXT_A}"\ncase_2.png,"{TEXT_B}"\n'  # mask_ prefix, extension mismatch
    )
    items = build_inference_items(input_dir=tmp_path)
    assert [(Path(i["image"]).name, i["text"]) for i in items] == [("case_2.jpg", TEXT_B), ("covid_1.png", TEXT_A)]


def test_folder_with_texts_json(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "texts.json").write_text(json.dumps({"a.png": TEXT_A}))
    assert build_inference_items(input_dir=tmp_path) == [{"image": str((tmp_path / "a.png").resolve()), "text": TEXT_A}]


def test_folder_missing_text_names_the_image_and_sidecar(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    (tmp_path / "texts.csv").write_text(f"Image,Description\na.png,{TEXT_A}\n")
    with pytest.raises(InferenceInputError, match=r"row 2 of .*texts\.csv: 4 fields where the header has 2; put texts"):
        build_inference_items(input_dir=tmp_path)
    (tmp_path / "texts.csv").write_text(f'Image,Description\na.png,"{TEXT_A}"\n')
    with pytest.raises(InferenceInputError, match=r"b\.png: missing text for this image \(no entry in .*texts\.csv\)"):
        build_inference_items(input_dir=tmp_path)
    items = build_inference_items(input_dir=tmp_path, default_text=TEXT_B)
    assert [i["text"] for i in items] == [TEXT_A, TEXT_B]


def test_folder_without_sidecar(tmp_path):
    _png(tmp_path / "a.png")
    with pytest.raises(InferenceInputError, match=r"a\.png: missing text .*no texts\.csv or texts\.json in"):
        build_inference_items(input_dir=tmp_path)
    assert build_inference_items(input_dir=tmp_path, default_text=TEXT_A)[0]["text"] == TEXT_A


def test_sidecar_row_naming_absent_file(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "texts.csv").write_text(f'Image,Description\na.png,"{TEXT_A}"\nghost.png,"{TEXT_B}"\n')
    with pytest.raises(InferenceInputError, match=r"row 3 of .*texts\.csv: names 'ghost\.png', which is not an image"):
        build_inference_items(input_dir=tmp_path)
    (tmp_path / "texts.csv").unlink()
    (tmp_path / "texts.json").write_text(json.dumps({"a.png": TEXT_A, "ghost.png": TEXT_B}))
    with pytest.raises(InferenceInputError, match=r"entry 2 of .*texts\.json: names 'ghost\.png'"):
        build_inference_items(input_dir=tmp_path)


def test_sidecar_empty_text_and_duplicates(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "texts.csv").write_text("Image,Description\na.png,\n")
    with pytest.raises(InferenceInputError, match=r"row 2 of .*texts\.csv: empty text for a\.png"):
        build_inference_items(input_dir=tmp_path)
    (tmp_path / "texts.csv").write_text(f'Image,Description\na.png,"{TEXT_A}"\na.png,"{TEXT_B}"\n')
    with pytest.raises(InferenceInputError, match=r"row 3 of .*texts\.csv: image 'a\.png' is listed again \(first at row 2\)"):
        read_text_sidecar(tmp_path / "texts.csv")
    (tmp_path / "texts.csv").write_text(f'Name,Text\na.png,"{TEXT_A}"\n')
    with pytest.raises(InferenceInputError, match=r"texts\.csv: lacks the column\(s\) 'Image', 'Description'"):
        build_inference_items(input_dir=tmp_path)


def test_json_sidecar_with_non_string_text(tmp_path):
    (tmp_path / "texts.json").write_text(json.dumps({"a.png": 3}))
    with pytest.raises(InferenceInputError, match=r"entry 1 of .*texts\.json \('a\.png'\): the text must be a string"):
        read_text_sidecar(tmp_path / "texts.json")


def test_empty_missing_and_ambiguous_folder(tmp_path):
    (tmp_path / "texts.csv").write_text("Image,Description\n")
    with pytest.raises(InferenceInputError, match=r"no images in the folder"):
        build_inference_items(input_dir=tmp_path)
    with pytest.raises(InferenceInputError, match=r"nowhere: input folder not found"):
        build_inference_items(input_dir=tmp_path / "nowhere")
    _png(tmp_path / "a.png")
    (tmp_path / "texts.json").write_text("{}")
    with pytest.raises(InferenceInputError, match=r"holds both texts\.csv and texts\.json"):
        build_inference_items(input_dir=tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# volumes


def test_one_item_per_input_volumes_included(tmp_path):
    _nifti(tmp_path / "vol.nii.gz", (6, 5, 4))
    _nifti(tmp_path / "flat.nii.gz", (6, 5))
    _nifti(tmp_path / "flat3d.nii", (6, 5, 1))
    _series(tmp_path / "series", num=3)
    (tmp_path / "empty_dir").mkdir()
    texts = {"vol.nii.gz": TEXT_A, "flat.nii.gz": TEXT_B, "flat3d.nii": TEXT_B, "series": TEXT_B}
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    items = build_inference_items(input_dir=tmp_path)
    assert [(Path(i["image"]).name, i["text"], is_volume(i["image"])) for i in items] == [
        ("flat.nii.gz", TEXT_B, False),
        ("flat3d.nii", TEXT_B, False),
        ("series", TEXT_B, True),
        ("vol.nii.gz", TEXT_A, True),
    ]
    assert all(set(item) == {"image", "text"} for item in items)  # one item per volume, not per slice


def test_is_volume(tmp_path):
    affine = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)  # axis 0 superior
    assert is_volume(_nifti(tmp_path / "sagittal_stack.nii.gz", (7, 5, 4), affine))
    assert not is_volume(_png(tmp_path / "a.png")) and not is_volume(_nifti(tmp_path / "one.nii", (7, 5, 1, 1)))
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(InferenceInputError, match=r"bad\.nii\.gz: cannot read the NIfTI header"):
        is_volume(tmp_path / "bad.nii.gz")
    with pytest.raises(InferenceInputError, match=r"4d\.nii\.gz: NIfTI image of shape \(4, 4, 3, 2\)"):
        is_volume(_nifti(tmp_path / "4d.nii.gz", (4, 4, 3, 2)))


def test_to_picture_layout():
    image = torch.arange(6.0).reshape(1, 2, 3)
    png = MetaTensor(image, meta={"filename_or_obj": "/data/a.PNG"})
    nifti = MetaTensor(image, meta={"filename_or_obj": "/data/a.nii.gz"})
    layout = ToPictureLayoutd(keys=["pred", "image"])
    assert layout({"pred": png.clone(), "image": png})["pred"].shape == (1, 2, 3)
    out = layout({"pred": image.clone(), "image": nifti})  # plain tensor pred: source from the image key
    assert out["pred"].shape == (1, 3, 2) and out["image"].shape == (1, 3, 2)
    torch.testing.assert_close(out["pred"][0], image[0].T)
