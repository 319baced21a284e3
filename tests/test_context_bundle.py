"""End to end: ``train.json`` trains a 2.5D model (``--volume_data true --context_slices 1``) on a tiny volume demo,
from NIfTI volumes and from the DICOM series, and stops a ``k > 0`` training on 2-D pictures with a clear message."""

from __future__ import annotations

import torch

from himix_monai.data.volume_demo import ensure_volume_demo_dataset
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
