"""End-to-end tests of bundle/configs/evaluate.json and bundle/configs/inference.json.

A tiny model is trained once through the real ``python -m monai.bundle run training`` command. Evaluation and
inference (datalist; folder of pictures, a NIfTI volume and a DICOM series with ``texts.csv``) then run the
command's ``ConfigWorkflow`` (initialize, run, finalize) in this process: on a busy machine the command's import
time is most of its cost. The MONAI Label route and the layout checks use ``ConfigParser``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from torch import nn

from monai.bundle import ConfigParser, ConfigWorkflow
from monai.transforms import EnsureChannelFirst, LoadImage, Resize

from himix_monai.data.ct import DicomSeriesReader
from himix_monai.data.inference_items import InferenceInputError
from himix_monai.transforms.mask import BinarizeMask

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
NETWORK_ARGS = ["--image_encoder", "test_convnext", "--network_def#num_heads", "4", "--image_size", "[64,64]"]
NETWORK_SIZE = 64
DEMO_SIZE = 128
PROMPT_A = "Unilateral pulmonary infection, one infected area, upper left lung."
PROMPT_B = "Bilateral pulmonary infection, three infected areas, lower left lung and lower right lung."


def workflow_run(config_file: str | list[str], **overrides) -> None:
    """What ``python -m monai.bundle run`` does (initialize, run, finalize), in this process, logging untouched."""
    overrides = {"image_encoder": "test_convnext", "network_def#num_heads": 4, "image_size": [64, 64], **overrides}
    workflow = ConfigWorkflow(config_file=config_file, logging_file=False, workflow_type=None, **overrides)
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def bundle_run(*args: str) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run ...`` from the repository root; fails the test with the log tail."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        pytest.fail(f"bundle run {args} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A bundle root with the demo data and ``models/model.pt`` of a 1-epoch tiny HiMix.

    Under pytest-xdist the workers share one run (in the session's common base folder, under a file lock).
    """
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    root = base / "himix_evaluate_inference_bundle"
    with FileLock(f"{root}.lock"):
        if not (root / "models" / "model.pt").is_file():
            bundle_run(
                "training", "--config_file", str(CONFIGS / "train.json"), "--bundle_root", str(root), "--epochs", "1",
                "--demo_num_cases", "24", "--batch_size", "4", *NETWORK_ARGS,
            )  # fmt: skip
    assert (root / "models" / "model.pt").is_file()
    return root


def demo_split(root: Path, split: str = "test") -> list[dict]:
    return json.loads((root / "data" / "demo" / "datalist.json").read_text())[split]


def display_hu(item: dict) -> np.ndarray:
    """The HU slice of a demo item in display orientation (rows, columns), from its DICOM file."""
    ds = pydicom.dcmread(item["image_dicom"])
    return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def hu_window(hu: np.ndarray) -> np.ndarray:
    """HU -> [0, 1] through the lung window -1000..400 HU (the bundle's default intensity_range), clipped."""
    return np.clip((hu + 1000.0) / 1400.0, 0.0, 1.0)


def write_nifti_volume(items: list[dict], path: Path) -> np.ndarray:
    """Stack the demo slices (MONAI layout) into a 3-D NIfTI with a rotated, scaled, shifted affine."""
    volume = np.stack([np.asarray(nib.load(item["image"]).dataobj) for item in items], axis=-1).astype(np.int16)
    angle = 0.2
    affine = np.array(
        [
            [-0.9 * np.cos(angle), 0.9 * np.sin(angle), 0.0, 121.5],
            [0.9 * np.sin(angle), 0.9 * np.cos(angle), 0.0, -83.0],
            [0.0, 0.0, 2.5, -40.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    nib.save(nib.Nifti1Image(volume, affine), str(path))
    return affine


def write_dicom_series(items: list[dict], folder: Path) -> None:
    """One series from the demo DICOM slices: shared series UID, 3 mm apart, file names in reverse order."""
    folder.mkdir()
    series_uid = pydicom.uid.generate_uid()
    for k, item in enumerate(items):
        ds = pydicom.dcmread(item["image_dicom"])
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = k + 1
        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, -150.0 + 3.0 * k]
        ds.save_as(folder / f"IM{len(items) - k:03d}.dcm")


# ----------------------------------------------------------------------------------------------------------------
# evaluate.json


def test_evaluate_writes_per_image_metrics_summary_and_overlays(trained):
    out = trained / "eval"
    models = {p.name: p.stat().st_mtime_ns for p in (trained / "models").iterdir()}
    workflow_run([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")], bundle_root=str(trained), demo_num_cases=24)
    test_items = demo_split(trained)
    assert {p.name: p.stat().st_mtime_ns for p in (trained / "models").iterdir()} == models  # evaluation does not train

    with open(out / "per_image_metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["image"] for row in rows] == [item["image"] for item in test_items]
    assert set(rows[0]) == {"image", "dice", "iou"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == len(test_items)
    assert set(summary) >= {"dice_mean", "dice_std", "iou_mean", "iou_std", "global_dice", "global_iou"}
    assert summary["dice_mean"] == pytest.approx(np.mean([float(row["dice"]) for row in rows]), abs=1e-5)
    # what the report does (issue 15): the same images with matched, permuted and no reports
    conditions = summary["report_conditions"]
    assert list(conditions) == ["matched", "permuted", "none"]
    assert all(c["n_images"] == len(test_items) for c in conditions.values())
    assert conditions["matched"]["dice_mean"] == pytest.approx(summary["dice_mean"], abs=1e-6)
    assert conditions["matched"]["global_dice"] == pytest.approx(summary["global_dice"], abs=1e-6)
    assert conditions["permuted"]["seed"] == 0

    # colours: the label at network size (demo NIfTI, drawn transposed = display orientation) is exactly the
    # red (FN) + yellow (TP) pixels; the prediction is yellow + green (FP); their Dice is the CSV's
    load, first = LoadImage(image_only=True), EnsureChannelFirst()
    resize = Resize((NETWORK_SIZE, NETWORK_SIZE), mode="nearest")
    for item, row in zip(test_items, rows):
        rgb = np.asarray(Image.open(out / "overlays" / f"{Path(item['image']).name[:-7]}_overlay.png")).astype(int)
        assert rgb.shape == (NETWORK_SIZE, NETWORK_SIZE, 3)
        label = np.asarray(resize(BinarizeMask()(first(load(item["label"]))))[0]).T > 0.5
        red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        assert label.any()
        np.testing.assert_array_equal(red - blue > 64, label)  # red or yellow where the lesion is
        pred = green - blue > 64  # yellow or green where the prediction is
        dice = 2 * (pred & label).sum() / max(pred.sum() + label.sum(), 1)
        assert float(row["dice"]) == pytest.approx(dice, abs=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# inference.json from the command line


def test_inference_on_datalist_writes_masks_at_original_size(trained, tmp_path):
    workflow_run(str(CONFIGS / "inference.json"), bundle_root=str(trained), output_dir=str(tmp_path), text_prompt=PROMPT_A)
    test_items = demo_split(trained)
    stems = sorted(Path(item["image"]).name[: -len(".nii.gz")] for item in test_items)
    masks = sorted((tmp_path / "masks").iterdir())
    assert [p.name for p in masks] == [f"{stem}_mask.png" for stem in stems]
    for path in masks:
        mask = np.asarray(Image.open(path))
        assert mask.shape == (DEMO_SIZE, DEMO_SIZE) and mask.dtype == np.uint8  # original size, network ran at 64
        assert set(np.unique(mask)) <= {0, 255}
    overlays = sorted(p.name for p in (tmp_path / "prediction_overlays").iterdir())
    assert overlays == [f"{stem}_overlay.png" for stem in stems]
    assert np.asarray(Image.open(tmp_path / "prediction_overlays" / overlays[0])).shape == (DEMO_SIZE, DEMO_SIZE, 3)


def test_model_records_its_settings_and_inference_names_every_difference(trained, tmp_path):
    """Fails if model.pt does not record the settings it was trained with, or if inference with other settings loads
    it (or fails without naming each differing setting, both values and the override that fixes it)."""
    from himix_monai.checkpoints import CheckpointSettingsError
    from himix_monai.networks import HiMix

    state = torch.load(trained / "models" / "model.pt", map_location="cpu", weights_only=True)
    record = HiMix.decode_settings(state["_extra_state"])  # a plain state dict: MONAI Label and ckpt_export load it
    assert record["preprocessing"]["image_size"] == [NETWORK_SIZE, NETWORK_SIZE]
    assert record["network"]["num_heads"] == 4 and record["network"]["image_encoder"] == "test_convnext"

    workflow = ConfigWorkflow(  # trained with --image_size "[64,64]" and 4 heads; inferred with 96x96 and the defaults
        config_file=str(CONFIGS / "inference.json"), logging_file=False, workflow_type=None, bundle_root=str(trained),
        output_dir=str(tmp_path), image_encoder="test_convnext", max_text_length=16, image_size=[96, 96],
    )  # fmt: skip
    with pytest.raises(RuntimeError) as error:  # MONAI wraps what a config expression raises
        workflow.initialize()
    cause = error.value
    while cause is not None and not isinstance(cause, CheckpointSettingsError):
        cause = cause.__cause__
    assert cause is not None, error.value
    message = str(cause)
    assert "image_size: [64, 64] -> [96, 96]" in message and '--image_size "[64,64]"' in message
    assert "num_heads: 4 -> 8" in message and "--network_def#num_heads 4" in message
    assert "text_length: 24 -> 16" in message and "--max_text_length 24" in message
    assert "image_encoder" not in message  # the same: not listed
    # with the overrides it names, the same command works
    workflow_run(str(CONFIGS / "inference.json"), bundle_root=str(trained), output_dir=str(tmp_path / "ok"))
    assert len(list((tmp_path / "ok" / "masks").iterdir())) == len(demo_split(trained))


def test_inference_on_folder_with_texts_csv_images_and_volumes(trained, tmp_path):
    items = demo_split(trained, "training")[:3]
    folder = tmp_path / "inputs"
    folder.mkdir()
    for k, item in enumerate(items[:2]):  # non-square 8-bit PNG pictures, 96 rows x 128 columns
        picture = (hu_window(display_hu(item))[16:112] * 255).astype(np.uint8)
        Image.fromarray(picture).save(folder / f"picture_{k}.png")
    affine = write_nifti_volume(items, folder / "ct_volume.nii.gz")
    write_dicom_series(items, folder / "series_001")
    with open(folder / "texts.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Image", "Description"])
        writer.writerows(
            [["picture_0.png", PROMPT_A], ["picture_1.png", PROMPT_B], ["ct_volume.nii.gz", PROMPT_A], ["series_001", PROMPT_B]]
        )
    out = tmp_path / "out"
    workflow_run(
        str(CONFIGS / "inference.json"), bundle_root=str(trained), input_dir=str(folder), output_dir=str(out),
        save_overlays="false", volume_batch_size=2,  # "false" as typed on the command line
    )  # fmt: skip
    assert sorted(p.name for p in (out / "masks").iterdir()) == [
        "ct_volume_mask.nii.gz", "picture_0_mask.png", "picture_1_mask.png", "series_001_mask.nii.gz",
    ]  # fmt: skip
    assert not (out / "prediction_overlays").exists()
    for k in range(2):
        assert Image.open(out / "masks" / f"picture_{k}_mask.png").size == (128, 96)  # PIL: (width, height)

    nifti_mask = nib.load(str(out / "masks" / "ct_volume_mask.nii.gz"))
    np.testing.assert_allclose(nifti_mask.affine, affine, atol=1e-5)
    assert nifti_mask.shape == (DEMO_SIZE, DEMO_SIZE, 3) and nifti_mask.get_data_dtype() == np.uint8

    series = LoadImage(reader=DicomSeriesReader(), image_only=True)(str(folder / "series_001"))
    dicom_mask = nib.load(str(out / "masks" / "series_001_mask.nii.gz"))
    np.testing.assert_allclose(dicom_mask.affine, series.affine.numpy(), atol=1e-5)
    assert dicom_mask.shape == series.shape == (DEMO_SIZE, DEMO_SIZE, 3)
    assert set(np.unique(np.asarray(dicom_mask.dataobj))) <= {0, 1}


# ----------------------------------------------------------------------------------------------------------------
# inference.json in this process


def inference_parser(root: Path, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser.update({"bundle_root": str(root), "image_encoder": "test_convnext", "network_def#num_heads": 4})
    parser.update({"image_size": [NETWORK_SIZE, NETWORK_SIZE], **overrides})
    return parser


def test_folder_missing_text_is_a_clear_error(trained, tmp_path):
    item = demo_split(trained)[0]
    Image.fromarray((hu_window(display_hu(item)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    Image.fromarray((hu_window(display_hu(item)) * 255).astype(np.uint8)).save(tmp_path / "b.png")
    (tmp_path / "texts.csv").write_text(f'Image,Description\na.png,"{PROMPT_A}"\n')
    parser = inference_parser(trained, input_dir=str(tmp_path))
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("items")
    chain, error = [], info.value
    while error is not None:
        chain.append(error)
        error = error.__cause__
    missing = [e for e in chain if isinstance(e, InferenceInputError)]
    assert missing and str(tmp_path / "b.png") in str(missing[0]) and "texts.csv" in str(missing[0])
    assert "missing text" in str(missing[0])


class ThresholdNet(nn.Module):
    """Logits ``10 * (image - 0.5)``: lesion where the windowed image is above 0.5 (HU > -300, lung window)."""

    def forward(self, image: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return (image[:, :1] - 0.5) * 10.0


def test_png_and_volume_masks_share_the_layout_of_the_source(trained, tmp_path):
    items = demo_split(trained, "validation")[:3]
    write_nifti_volume(items, tmp_path / "volume.nii.gz")
    write_dicom_series(items, tmp_path / "series")
    datalist = tmp_path / "datalist.json"
    entries = [{"image": item["image"], "text": item["text"]} for item in items]
    entries += [{"image": str(tmp_path / "volume.nii.gz"), "text": PROMPT_A}, {"image": "series", "text": PROMPT_B}]
    datalist.write_text(json.dumps({"test": entries}))
    parser = inference_parser(
        trained, input_datalist=str(datalist), output_dir=str(tmp_path / "out"), save_overlays=False,
        network={"_target_": f"{__name__}.ThresholdNet"},
    )  # fmt: skip
    parser.get_parsed_content("run")  # no initialize: nothing to load into ThresholdNet

    masks = tmp_path / "out" / "masks"
    volume = np.asarray(nib.load(str(masks / "volume_mask.nii.gz")).dataobj)
    series = np.asarray(nib.load(str(masks / "series_mask.nii.gz")).dataobj)
    for k, item in enumerate(items):
        png = np.asarray(Image.open(masks / f"{Path(item['image']).name[:-7]}_mask.png")) > 127
        expected = display_hu(item) > -300  # the ThresholdNet mask in display orientation
        assert 0.1 < png.mean() < 0.9
        assert (png == expected).mean() > 0.97 and (png == expected.T).mean() < 0.9  # the PNG looks like the DICOM
        np.testing.assert_array_equal(volume[..., k].T, png)  # the 2-D and the volume routes agree voxel for voxel
        np.testing.assert_array_equal(series[..., k].T, png)


def test_monai_label_route_uses_the_text_prompt(trained):
    """MONAI Label: copies request values into ``displayable_configs`` and ``data``, then calls ``inferer(image[None], net)``."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser.config.update({"bundle_root": str(trained)})  # as MONAI Label's _load_bundle_config
    parser.update({"image_encoder": "test_convnext", "network_def#num_heads": 4, "image_size": [64, 64]})
    assert parser.get_parsed_content("displayable_configs") == {"text_prompt": ""}
    network = parser.get_parsed_content("network_def", instantiate=True)
    checkpoint = torch.load(trained / "models" / "model.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(checkpoint.get("model", checkpoint))
    network.eval()
    image = demo_split(trained)[0]["image"]

    outputs = {}
    for prompt in (PROMPT_A, PROMPT_B, ""):
        parser["displayable_configs"].update({"text_prompt": prompt})
        parser.parse()
        # MONAI Label merges the request into ``data``: the prompt travels with the image, not through the config
        data = parser.get_parsed_content("preprocessing", instantiate=True)({"image": image, "text_prompt": prompt})
        inferer = parser.get_parsed_content("inferer", instantiate=True)
        assert inferer.text_prompt is None and data["image"].meta.get("text_prompt", "") == prompt
        with torch.no_grad():
            outputs[prompt] = inferer(data["image"][None], network)
        assert outputs[prompt].shape == (1, 1, NETWORK_SIZE, NETWORK_SIZE)
    assert not torch.allclose(outputs[PROMPT_A], outputs[PROMPT_B])  # the prompt reaches the network
    assert not torch.allclose(outputs[PROMPT_A], outputs[""])  # and an empty prompt means no text
    post = parser.get_parsed_content("postprocessing", instantiate=True)
    pred = post({**data, "pred": outputs[PROMPT_A][0]})["pred"]
    assert pred.shape == (DEMO_SIZE, DEMO_SIZE) and pred.dtype == torch.uint8  # a label map of the image's size
