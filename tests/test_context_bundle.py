"""End to end: ``train.json`` trains a 2.5D model (``--volume_data true --context_slices 1``) on a tiny volume demo,
from NIfTI volumes and from the DICOM series, and stops a ``k > 0`` training on 2-D pictures with a clear message."""

from __future__ import annotations

from pathlib import Path

import torch

from himix_monai.demo.volumes import ensure_volume_demo_dataset
from tests.test_training_bundle import check_exit, load_state, run_trainings

VOLUMES = {"demo_num_cases": 6, "demo_image_size": 64, "volume_demo_depth": 8, "epochs": 1, "batch_size": 2}


def test_bundle_trains_context_slices_on_nifti_and_dicom_volumes(tmp_path):
    data = tmp_path / "volumes"
    ensure_volume_demo_dataset(data, num=6, size=64, depth=8)  # what the bundle's initialize does for volume_data
    common = {**VOLUMES, "dataset_dir": data, "volume_data": "true", "context_slices": 1, "slices_per_volume": 2}
    nifti, dicom, flat = tmp_path / "nifti", tmp_path / "dicom", tmp_path / "flat"
    runs = run_trainings(
        (nifti, common),
        (dicom, {**common, "volume_image_key": "image_dicom"}),
        (flat, {"context_slices": 1, "demo_num_cases": 4, "epochs": 1}),  # 2-D demo pictures with k = 1
    )
    for root, proc in zip((nifti, dicom), runs[:2]):
        check_exit(proc)
        stem = load_state(root / "models" / "model.pt")["image_encoder.backbone.stem_0.weight"]
        assert stem.shape[1] == 3  # (2k+1) * 1 input channels
        # 4 training volumes x 2 slices, 2 volumes per iteration: 8 slices a step, 2 steps; validation per volume
        assert "Epoch: 1/1, Iter: 2/2" in proc.stdout
        assert "val_mean_dice" in proc.stdout and "val_slice_dice" in proc.stdout
    proc = check_exit(runs[2], expect_ok=False)
    assert "context_slices=1 needs volumes" in proc.stdout and "--volume_data true" in proc.stdout
    assert not (flat / "models" / "model.pt").exists()
    assert torch.equal(  # the same volumes and seed: the DICOM series trains exactly like the NIfTI volumes
        load_state(nifti / "models" / "model.pt")["image_encoder.backbone.stem_0.weight"],
        load_state(dicom / "models" / "model.pt")["image_encoder.backbone.stem_0.weight"],
    )


def test_bundle_infers_a_context_model_on_volumes_and_refuses_pictures(tmp_path):
    """inference.json with ``--context_slices 1``: one NIfTI mask per test volume with the source's shape and affine
    (stacked neighbours in, SliceInferer over the slices, Invertd back); a 2-D picture stops with the message."""
    import json
    import subprocess
    import sys

    import nibabel as nib
    import numpy as np
    from PIL import Image

    from tests.test_training_bundle import REPO, TINY

    data, root = tmp_path / "volumes", tmp_path / "run"
    ensure_volume_demo_dataset(data, num=6, size=64, depth=8)
    common = {**VOLUMES, "dataset_dir": data, "volume_data": "true", "context_slices": 1, "slices_per_volume": 2}
    check_exit(run_trainings((root, common))[0])

    def infer(out, **inputs):
        settings = {k: v for k, v in TINY.items() if k in ("image_encoder", "network_def#num_heads", "image_size")}
        argv = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(REPO / "bundle" / "configs" / "inference.json"),
                "--bundle_root", str(root), "--output_dir", str(out), "--context_slices", "1"]  # fmt: skip
        for key, value in {**settings, **inputs}.items():
            argv += [f"--{key}", str(value)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=600)

    proc = infer(tmp_path / "out", input_datalist=data / "datalist.json", input_split="test")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tests = json.loads((data / "datalist.json").read_text())["test"]
    masks = sorted((tmp_path / "out" / "masks").rglob("*.nii.gz"))
    assert len(masks) == len(tests) > 0
    for item in tests:
        source = nib.load(item["image"])
        mask = nib.load(next(m for m in masks if m.name.startswith(Path(item["image"]).name.split(".")[0])))
        assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}

    pictures = tmp_path / "pictures"
    pictures.mkdir()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(pictures / "slice.png")
    (pictures / "texts.csv").write_text("Image,Description\nslice.png,upper left lung\n")
    proc = infer(tmp_path / "out2", input_dir=pictures)
    assert proc.returncode != 0
    assert "needs volumes (context_slices=1)" in (proc.stdout + proc.stderr).strip().splitlines()[-1]
