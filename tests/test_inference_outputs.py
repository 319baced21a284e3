"""The inference read path's four defects (issue 14), each through ``bundle/configs/inference.json``.

The network is a fixed threshold (no training, no checkpoint): the tests check where and how the masks are
written, and what a bad input says, not what a model predicts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from monai.bundle import ConfigParser
from monai.transforms import LoadImage

from himix_monai.data.ct import CTReadError, DicomSeriesReader
from himix_monai.data.inference_items import OutputNames
from himix_monai.errors import find_project_error
from tests.test_bundle_evaluate_inference import trained  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
TEXT = "Unilateral pulmonary infection, one infected area, upper left lung."


class ThresholdNet(nn.Module):
    """Logits ``10 * (image - 0.5)``: foreground where the scaled image is above 0.5."""

    def forward(self, image: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return (image[:, :1] - 0.5) * 10.0


def run_inference(root: Path, **overrides) -> None:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser.update({"bundle_root": str(root), "image_encoder": "test_convnext", "network_def#num_heads": 4})
    parser.update({"image_size": [32, 32], "intensity_range": [0, 255], "save_overlays": False})
    parser.update({"network": {"_target_": f"{__name__}.ThresholdNet"}, **overrides})
    parser.get_parsed_content("run")


def picture(path: Path, bright_rows: int, size: tuple[int, int] = (40, 48)) -> Path:
    """A grey picture whose top ``bright_rows`` rows are white (the ThresholdNet's foreground)."""
    pixels = np.zeros(size, np.uint8)
    pixels[:bright_rows] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def write_datalist(folder: Path, images: list[Path]) -> Path:
    datalist = folder / "datalist.json"
    datalist.write_text(json.dumps({"test": [{"image": str(p), "text": TEXT} for p in images]}))
    return datalist


def test_output_names_are_unique_and_keep_relative_paths():
    names = OutputNames(
        ["/in/A/img.png", "/in/B/img.png", "/in/x.png", "/in/x.JPG", {"image": "/in/series"}, "/in/C/D/y.nii.gz"]
    )
    assert names.names == {
        "/in/A/img.png": "A/img", "/in/B/img.png": "B/img", "/in/x.png": "x_png", "/in/x.JPG": "x_JPG",
        "/in/series": "series", "/in/C/D/y.nii.gz": "y",
    }  # fmt: skip
    assert OutputNames(["/in/x.png"]).stem("/in/x.png") == "x"


def test_same_stem_inputs_get_their_own_masks(tmp_path):
    inputs = tmp_path / "in"
    images = {
        "x.png": picture(inputs / "x.png", 10), "x.jpg": picture(inputs / "x.jpg", 20),
        "A/img.png": picture(inputs / "A" / "img.png", 5), "B/img.png": picture(inputs / "B" / "img.png", 30),
    }  # fmt: skip
    out = tmp_path / "out"
    run_inference(tmp_path, input_datalist=str(write_datalist(tmp_path, list(images.values()))), output_dir=str(out))
    masks = {"x.png": "x_png_mask.png", "x.jpg": "x_jpg_mask.png", "A/img.png": "A/img_mask.png", "B/img.png": "B/img_mask.png"}
    assert sorted(p.relative_to(out / "masks").as_posix() for p in (out / "masks").rglob("*.png")) == sorted(masks.values())
    for name, mask in masks.items():
        rows = (np.asarray(Image.open(out / "masks" / mask)) > 127).any(axis=1).sum()
        expected = (np.asarray(Image.open(images[name])) > 127).any(axis=1).sum()
        assert abs(int(rows) - int(expected)) <= 2, name  # each mask is its own input's


def test_a_link_in_the_output_folder_is_replaced_not_written_through(tmp_path):
    image = picture(tmp_path / "in" / "y.png", 10)
    outside = tmp_path / "precious.png"
    outside.write_bytes(b"a file the user keeps")
    masks = tmp_path / "out" / "masks"
    masks.mkdir(parents=True)
    (masks / "y_mask.png").symlink_to(outside)
    run_inference(tmp_path, input_datalist=str(write_datalist(tmp_path, [image])), output_dir=str(tmp_path / "out"))
    assert outside.read_bytes() == b"a file the user keeps"
    assert not (masks / "y_mask.png").is_symlink()
    assert np.asarray(Image.open(masks / "y_mask.png")).shape == (40, 48)
    assert not [p for p in masks.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_a_truncated_image_is_named(tmp_path):
    good = picture(tmp_path / "in" / "good.png", 10)
    bad = tmp_path / "in" / "bad.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300), dtype=np.uint8)).save(bad)
    bad.write_bytes(bad.read_bytes()[:2000])
    with pytest.raises(Exception) as info:
        run_inference(tmp_path, input_datalist=str(write_datalist(tmp_path, [good, bad])), output_dir=str(tmp_path / "o"))
    chain, error = [], info.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert any(str(bad) in message for message in chain), chain[:3]


def test_a_series_with_a_missing_slice_is_refused(tmp_path):
    from tests.test_ct import _stored_image, _write_dicom

    series = tmp_path / "series_007"
    series.mkdir()
    for k, z in enumerate((0.0, 2.0, 4.0, 8.0, 10.0)):  # the slice at z = 6 is missing
        _write_dicom(series / f"IM{k}.dcm", _stored_image(offset=k), position=(0, 0, z), instance=k + 1)
    with pytest.raises(CTReadError, match=r"series_007: .*missing slice.* 4(\.0+)? and 8(\.0+)? mm") as info:
        LoadImage(reader=DicomSeriesReader(), image_only=True)(str(series))
    assert "IM2.dcm" in str(info.value) and "IM3.dcm" in str(info.value)
    datalist = write_datalist(tmp_path, [series])  # through the bundle: refused, named, and no mask written
    with pytest.raises(Exception) as info:
        run_inference(tmp_path, input_datalist=str(datalist), output_dir=str(tmp_path / "out"), intensity_range=[-1024, 2000])
    error = find_project_error(info.value)
    assert isinstance(error, CTReadError) and "series_007" in str(error) and "missing slice" in str(error)
    assert not list((tmp_path / "out").rglob("*.nii.gz"))


def test_evaluation_scores_at_the_original_resolution_too(tmp_path):
    """A label that is exactly the network's answer at the image's own size scores 1 at the original
    resolution; the network-resolution score (labels resized, as the paper reports) is kept beside it."""
    from tests.test_bad_input import TRAIN, EVALUATE

    from monai.transforms import Resize

    rng = np.random.default_rng(0)
    items = []
    for k in range(3):
        pixels = (rng.random((37, 53)) > 0.5).astype(np.uint8) * 255  # fine detail that resizing to 32 loses
        image = tmp_path / f"case_{k}.png"
        Image.fromarray(pixels).save(image)
        small = Resize((32, 32), mode="bilinear")(torch.as_tensor(pixels[None] / 255.0, dtype=torch.float32)) > 0.5
        answer = Resize((37, 53), mode="nearest")(small.float())[0].numpy() > 0.5  # the prediction, inverted
        Image.fromarray(answer.astype(np.uint8) * 255).save(tmp_path / f"case_{k}_mask.png")
        items.append({"image": str(image), "label": str(tmp_path / f"case_{k}_mask.png"), "text": TEXT})
    (tmp_path / "datalist.json").write_text(json.dumps({"training": items, "validation": items, "test": items}))
    parser = ConfigParser()
    parser.read_config([TRAIN, EVALUATE])
    parser.update({"bundle_root": str(tmp_path), "datalist": str(tmp_path / "datalist.json"), "use_demo_data": False})
    parser.update({"image_encoder": "test_convnext", "network_def#num_heads": 4, "image_size": [32, 32]})
    parser.update({"intensity_range": [0, 255], "save_overlays": False, "output_dir": str(tmp_path / "eval")})
    parser.update({"network": {"_target_": f"{__name__}.ThresholdNet"}, "num_workers": 0})
    parser.update({"validate#handlers": "$[@eval_handlers#metrics_saver]"})
    parser.get_parsed_content("validate#evaluator").run()

    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["resolution"] == "network" and summary["n_images"] == 3
    original = summary["original_resolution"]
    assert original["n_images"] == 3
    assert original["dice_mean"] == pytest.approx(1.0) and original["global_iou"] == pytest.approx(1.0)
    assert summary["dice_mean"] < 0.9  # at 32x32 the resized label and the prediction disagree
    rows = (tmp_path / "eval" / "per_image_metrics_original_resolution.csv").read_text().splitlines()
    assert rows[0] == "image,dice,iou" and rows[1].startswith(items[0]["image"] + ",1.000000")


def test_volumes_are_scaled_with_the_training_intensity_range(tmp_path):
    """One normalisation setting: CT slices take ``intensity_range`` as pictures and training do (was a separate
    ``ct_window``); the old setting is refused by name."""
    import nibabel as nib

    from himix_monai.config_utils import check_replaced_setting
    from himix_monai.errors import SettingError

    volume = np.zeros((20, 24, 3), np.int16)
    volume[5:15, 4:20] = 200  # foreground only when 200 maps above 0.5: intensity_range [0, 255], not [-1000, 400]
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "vol.nii.gz"))
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"test": [{"image": str(tmp_path / "vol.nii.gz"), "text": TEXT}]}))
    for low, expected in ((0, volume > 127), (-1000, np.ones(volume.shape, bool))):
        out = tmp_path / f"out_{low}"
        run_inference(tmp_path, input_datalist=str(datalist), output_dir=str(out), intensity_range=[low, 255])
        mask = np.asarray(nib.load(str(out / "masks" / "vol_mask.nii.gz")).dataobj) > 0
        assert (mask == expected).mean() > 0.95, low
    check_replaced_setting("ct_window", None, "intensity_range")
    with pytest.raises(SettingError, match="--ct_window 'lung': this setting was replaced by --intensity_range"):
        check_replaced_setting("ct_window", "lung", "intensity_range")


def test_a_second_inference_or_evaluation_into_the_same_folder_is_refused_unless_asked(trained, tmp_path):
    """The masks and scores of an earlier run are never replaced in silence; --overwrite true replaces them."""
    from himix_monai.errors import find_project_error
    from himix_monai.run_guard import RunGuardError
    from tests.test_bundle_evaluate_inference import CONFIGS, workflow_run

    workflow_run(str(CONFIGS / "inference.json"), bundle_root=str(trained), output_dir=str(tmp_path))
    masks = {p.name: p.read_bytes() for p in (tmp_path / "masks").iterdir()}
    assert masks
    with pytest.raises(Exception) as caught:
        workflow_run(str(CONFIGS / "inference.json"), bundle_root=str(trained), output_dir=str(tmp_path))
    error = find_project_error(caught.value)
    assert isinstance(error, RunGuardError) and "--overwrite true" in str(error) and "masks" in str(error)
    assert {p.name: p.read_bytes() for p in (tmp_path / "masks").iterdir()} == masks
    workflow_run(str(CONFIGS / "inference.json"), bundle_root=str(trained), output_dir=str(tmp_path), overwrite=True)

    evaluate = [str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")]
    out = tmp_path / "eval"
    workflow_run(evaluate, bundle_root=str(trained), output_dir=str(out), demo_num_cases=24,
                 save_overlays=False, evaluate_report_conditions=False)
    summary = (out / "summary.json").read_bytes()
    with pytest.raises(Exception) as caught:
        workflow_run(evaluate, bundle_root=str(trained), output_dir=str(out), demo_num_cases=24,
                     save_overlays=False, evaluate_report_conditions=False)
    assert isinstance(find_project_error(caught.value), RunGuardError)
    assert (out / "summary.json").read_bytes() == summary


def test_nifti_volumes_give_one_mask_each_with_the_source_geometry(tmp_path):
    """One item and one NIfTI mask per volume, on the source voxels: a volume stored with the axial axis last and
    one stored with it first (slices taken along it, as the 2-D route lays a slice out); a link in the output
    folder is replaced, not written through."""
    import nibabel as nib

    rng = np.random.default_rng(1)
    axial_last = (rng.random((20, 24, 3)) * 255).astype(np.int16)
    axial_first = (rng.random((4, 20, 24)) * 255).astype(np.int16)
    affines = {
        "axial_last": np.array([[-0.8, 0, 0, 10], [0, 0.7, 0, -5], [0, 0, 2.5, 30], [0, 0, 0, 1]]),
        "axial_first": np.array([[0, 0, -0.7, 10], [0, 0.8, 0, -5], [3.0, 0, 0, 30], [0, 0, 0, 1]]),
    }
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, data in (("axial_last", axial_last), ("axial_first", axial_first)):
        nib.save(nib.Nifti1Image(data, affines[name]), str(inputs / f"{name}.nii.gz"))
    outside = tmp_path / "precious.nii.gz"
    outside.write_bytes(b"a file the user keeps")
    masks = tmp_path / "out" / "masks"
    masks.mkdir(parents=True)
    (masks / "axial_last_mask.nii.gz").symlink_to(outside)
    datalist = write_datalist(tmp_path, [inputs / "axial_last.nii.gz", inputs / "axial_first.nii.gz"])
    run_inference(tmp_path, input_datalist=str(datalist), output_dir=str(tmp_path / "out"), image_size=[20, 24])
    assert sorted(p.name for p in masks.iterdir()) == ["axial_first_mask.nii.gz", "axial_last_mask.nii.gz"]
    assert outside.read_bytes() == b"a file the user keeps" and not (masks / "axial_last_mask.nii.gz").is_symlink()
    for name, data in (("axial_last", axial_last), ("axial_first", axial_first)):
        mask = nib.load(str(masks / f"{name}_mask.nii.gz"))
        assert mask.shape == data.shape and mask.get_data_dtype() == np.uint8
        np.testing.assert_allclose(mask.affine, affines[name], atol=1e-5)
        np.testing.assert_array_equal(np.asarray(mask.dataobj), (data > 127.5).astype(np.uint8))


def test_a_dicom_series_gives_a_nifti_mask_with_the_series_geometry(tmp_path):
    """Slices stacked by position (file names and InstanceNumber in another order), the mask's voxels at the world
    positions of the DICOM pixels they were predicted from."""
    import nibabel as nib

    from tests.test_ct import _lps_world, _stored_image, _write_dicom

    series = tmp_path / "series_002"
    series.mkdir()
    datasets = []
    for k, z in enumerate((-40.0, -37.5, -35.0, -32.5)):
        datasets.append(_write_dicom(series / f"IM{9 - k}.dcm", _stored_image(offset=40 * k), slope=1.0,
                                     position=(-100.0, -80.0, z), instance=[2, 4, 1, 3][k]))  # fmt: skip
    datalist = write_datalist(tmp_path, [series])
    run_inference(tmp_path, input_datalist=str(datalist), output_dir=str(tmp_path / "out"), image_size=[5, 6],
                  intensity_range=[-1024, 0])  # fmt: skip
    assert [p.name for p in (tmp_path / "out" / "masks").iterdir()] == ["series_002_mask.nii.gz"]
    mask_image = nib.load(str(tmp_path / "out" / "masks" / "series_002_mask.nii.gz"))
    mask = np.asarray(mask_image.dataobj)
    assert mask.shape == (5, 6, 4)
    predicted = {tuple(np.round(mask_image.affine @ [i, j, k, 1], 4)[:3]) for i, j, k in zip(*np.nonzero(mask))}
    expected = set()
    for dataset in datasets:  # voxels above -512 HU straight from the DICOM files, in RAS world coordinates
        for row, column in zip(*np.nonzero(dataset.pixel_array.astype(float) - 1024 > -512)):
            x, y, z = _lps_world(dataset, row, column)
            expected.add(tuple(np.round([-x, -y, z], 4)))
    assert predicted == expected and 0 < len(expected) < mask.size


def test_mixed_series_is_refused_through_the_bundle(tmp_path):
    from tests.test_ct import _stored_image, _write_dicom

    series = tmp_path / "two_series"
    series.mkdir()
    for k in range(3):
        _write_dicom(series / f"IM{k}.dcm", _stored_image(), position=(0, 0, 2.0 * k), instance=k + 1,
                     series_uid="1.2.3" if k < 2 else "1.2.9")  # fmt: skip
    with pytest.raises(Exception) as info:
        run_inference(tmp_path, input_datalist=str(write_datalist(tmp_path, [series])), output_dir=str(tmp_path / "o"))
    error = find_project_error(info.value)
    assert isinstance(error, CTReadError) and "two_series: mixed DICOM series, 2 SeriesInstanceUIDs" in str(error)
