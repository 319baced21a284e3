"""End-to-end tests of the dataset converters in data_prep (LViT, GuideDecoder/HiMix csv, medvlsm json).

Every fixture is a tiny dataset written in tmp_path in the published layout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_prep import lvit, medvlsm, prompt_csv
from himix_monai.data.datalist import load_datalist

REPO_ROOT = Path(__file__).resolve().parents[1]


def save_image(path: Path, height: int = 16, width: int = 16, channels: int = 3) -> Path:
    """Write a small random image; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (height, width, channels) if channels > 1 else (height, width)
    pixels = np.random.default_rng(len(path.name)).integers(0, 255, shape, dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_table(path: Path, records: list[list]) -> None:
    """Write an Image/Description table as xlsx or csv (from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame({"Image": [r[0] for r in records], "Description": [r[1] for r in records]})
    if path.suffix == ".xlsx":
        table.to_excel(path, index=False)
    else:
        table.to_csv(path, index=False)


def medvlsm_entry(name: str, text: str | None, mask_name: str | None = None) -> dict:
    text = text or ""
    return {
        "img_name": name,
        "mask_name": mask_name or name.replace(".jpg", ".png"),
        "prompts": {
            "p0": "",
            "p1": "polyp",
            "p6": f"p6 {text}".strip() if text.strip() else text,
            "p7": ["polyp v0", "polyp v1"],
            "p9": [text, f"{text} (variant 1)", f"{text} (variant 2)"],
        },
    }


def write_medvlsm_annotations(path: Path, records: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([medvlsm_entry(name, text) for name, text in records]))


@dataclass
class Dataset:
    """A tiny dataset whose training annotation can be edited to create bad inputs."""

    module: object
    root: Path
    annotation: Path
    records: list[list]
    images: list[Path]
    masks: list[Path]
    write: Callable[[Path, list[list]], None]
    unit: str = "row"
    first_row: int = 2
    extra: dict = field(default_factory=dict)

    def save(self) -> None:
        self.write(self.annotation, self.records)

    def set_text(self, index: int, text: str | None) -> None:
        self.records[index][1] = text
        self.save()

    def append(self, name: str, text: str) -> int:
        self.records.append([name, text])
        self.save()
        return len(self.records) - 1

    def location(self, index: int) -> str:
        return f"{self.unit} {self.first_row + index} of {self.annotation}"


def make_lvit(root: Path, num_train: int = 4, sheet_suffix: str = ".xlsx") -> Dataset:
    """Train_Folder (num_train items), Val_Folder (1), Test_Folder (1), each with its own text sheet."""
    datasets = {}
    for folder, count in (("Train", num_train), ("Val", 1), ("Test", 1)):
        records, images, masks = [], [], []
        for index in range(count):
            name = f"{folder.lower()}_{index}.png"
            images.append(save_image(root / f"{folder}_Folder" / "img" / name))
            masks.append(save_image(root / f"{folder}_Folder" / "labelcol" / name, channels=1))
            records.append([name, f"{folder} lesion {index}."])
        sheet = root / f"{folder}_Folder" / f"{folder}_text{sheet_suffix}"
        write_table(sheet, records)
        datasets[folder] = Dataset(lvit, root, sheet, records, images, masks, write_table)
    return datasets["Train"]


def make_prompt_csv(root: Path, num_train: int = 4, with_val: bool = True) -> Dataset:
    """HiMix QaTa style: prompt/{train,val,test}.csv, {Train,Val,Test}/{Images,GTs}, masks mask_<name>."""
    datasets = {}
    splits = [("train", "Train", num_train), ("val", "Val", 1 if with_val else 0), ("test", "Test", 1)]
    for csv_name, folder, count in splits:
        if count == 0:
            continue
        records, images, masks = [], [], []
        for index in range(count):
            name = f"{csv_name}_{index}.png"
            images.append(save_image(root / folder / "Images" / name))
            masks.append(save_image(root / folder / "GTs" / f"mask_{name}", channels=1))
            records.append([name, f"{csv_name} infection {index}."])
        csv_file = root / "prompt" / f"{csv_name}.csv"
        write_table(csv_file, records)
        datasets[csv_name] = Dataset(prompt_csv, root, csv_file, records, images, masks, write_table)
    return datasets["train"]


def make_medvlsm(root: Path, num_train: int = 4) -> Dataset:
    """anns/{train,val,test}.json, images/*.jpg, masks/*.png."""
    datasets = {}
    for split, count in (("train", num_train), ("val", 1), ("test", 1)):
        records, images, masks = [], [], []
        for index in range(count):
            name = f"{split}_{index}.jpg"
            images.append(save_image(root / "images" / name))
            masks.append(save_image(root / "masks" / name.replace(".jpg", ".png"), channels=1))
            records.append([name, f"one small {split} polyp {index}"])
        path = root / "anns" / f"{split}.json"
        write_medvlsm_annotations(path, records)
        datasets[split] = Dataset(
            medvlsm, root, path, records, images, masks, write_medvlsm_annotations, unit="entry", first_row=1
        )
    return datasets["train"]


def run(module, argv: list[str], capsys) -> tuple[int, str, str]:
    code = module.main([*argv, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def convert(dataset: Dataset, out: Path, capsys, *extra: str) -> tuple[int, str, str]:
    return run(dataset.module, ["--root", str(dataset.root), "--out", str(out), *extra], capsys)


def names(items: list[dict], key: str = "image") -> list[str]:
    return [Path(item[key]).name for item in items]


# ---------------------------------------------------------------- LViT


def test_lvit_end_to_end(tmp_path, capsys):
    dataset = make_lvit(tmp_path / "data")
    out = tmp_path / "out" / "datalist.json"
    code, stdout, stderr = convert(dataset, out, capsys)
    assert code == 0, stderr
    assert stdout.strip().splitlines()[-1] == f"wrote {out}: training=4 validation=1 test=1; skipped 0"
    training = load_datalist(out, "training")
    assert names(training) == ["train_0.png", "train_1.png", "train_2.png", "train_3.png"]
    assert training[0] == {
        "image": str((tmp_path / "data/Train_Folder/img/train_0.png").resolve()),
        "label": str((tmp_path / "data/Train_Folder/labelcol/train_0.png").resolve()),
        "text": "Train lesion 0.",
    }
    assert names(load_datalist(out, "validation")) == ["val_0.png"]
    assert [i["text"] for i in load_datalist(out, "test")] == ["Test lesion 0."]
    assert stderr == ""


def test_lvit_as_a_module_subprocess(tmp_path):
    dataset = make_lvit(tmp_path / "data", sheet_suffix=".csv")
    out = tmp_path / "datalist.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "data_prep.lvit", "--root", str(dataset.root), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f"wrote {out}: training=4 validation=1 test=1; skipped 0")
    assert len(load_datalist(out, "training")) == 4
    # --strict failure: non-zero exit, message names file and row, old datalist intact
    old = out.read_text()
    dataset.masks[2].unlink()
    result = subprocess.run([*command, "--strict"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert f"row 4 of {dataset.annotation}" in result.stderr and "missing mask" in result.stderr
    assert out.read_text() == old


def test_lvit_qata_combined_sheet_and_mask_prefix(tmp_path, capsys):
    root = tmp_path / "QaTa"
    records = []
    for folder, count in (("Train", 3), ("Val", 2)):
        for index in range(count):
            name = f"covid_{folder}_{index}.png"
            save_image(root / f"{folder}_Folder" / "img" / name)
            save_image(root / f"{folder}_Folder" / "labelcol" / f"mask_{name}", channels=1)
            records.append([name, f"Bilateral pulmonary infection, {folder} {index}."])
    records.insert(2, [records[3][0], records[3][1]])  # a Val image listed twice: row 4 and row 6
    write_table(root / "Train_Val_text.xlsx", records)
    save_image(root / "Test_Folder" / "img" / "covid_t.png")
    save_image(root / "Test_Folder" / "labelcol" / "mask_covid_t.png", channels=1)
    write_table(root / "Test_Folder" / "Test_text.csv", [["covid_t.png", "Left lung infection."]])
    out = tmp_path / "qata.json"
    code, stdout, stderr = run(lvit, ["--root", str(root), "--out", str(out)], capsys)
    assert code == 0, stderr
    assert "training=3 validation=2 test=1; skipped 1 (duplicate id: 1)" in stdout
    assert f"row 6 of {root / 'Train_Val_text.xlsx'} ('covid_Val_0.png'): duplicate id" in stderr
    assert names(load_datalist(out, "training"), "label") == [f"mask_covid_Train_{i}.png" for i in range(3)]
    assert names(load_datalist(out, "validation"), "label") == ["mask_covid_Val_0.png", "mask_covid_Val_1.png"]
    assert names(load_datalist(out, "test"), "label") == ["mask_covid_t.png"]


@pytest.mark.parametrize(
    "name, folder_split, expected",
    [
        ("Train_text.xlsx", None, ("training",)),
        ("Train_Val_text.xlsx", None, ("training", "validation")),
        ("Test_text.csv", "test", ("test",)),
        ("Train_text_MosMed.xlsx", None, ("training",)),
        ("text.xlsx", "validation", ("validation",)),
        ("text.xlsx", None, None),
        ("Train.xlsx", "training", None),
        ("Train_text.json", "training", None),
    ],
)
def test_lvit_sheet_names(name, folder_split, expected):
    assert lvit.sheet_splits(Path(name), folder_split) == expected


def test_lvit_split_sheet_preferred_over_combined(tmp_path, capsys):
    dataset = make_lvit(tmp_path / "data")
    combined = [["train_0.png", "combined text"], ["val_0.png", "combined"]]
    write_table(tmp_path / "data" / "Train_Val_text.xlsx", combined)
    code, stdout, stderr = convert(dataset, tmp_path / "d.json", capsys)
    assert code == 0, stderr
    assert load_datalist(tmp_path / "d.json", "training")[0]["text"] == "Train lesion 0."


def test_lvit_extension_mismatch(tmp_path, capsys):
    """MoNuSeg's Test folder: the sheet says .png, the images are .tif."""
    root = tmp_path / "MoNuSeg"
    records = []
    for index in range(3):
        save_image(root / "Test_Folder" / "img" / f"TCGA-{index}.tif")
        save_image(root / "Test_Folder" / "labelcol" / f"TCGA-{index}.png", channels=1)
        records.append([f"TCGA-{index}.png", "The nuclei are sparsely distributed."])
    write_table(root / "Test_Folder" / "Test_text.xlsx", records)
    out = tmp_path / "d.json"
    code, stdout, stderr = run(lvit, ["--root", str(root), "--out", str(out)], capsys)
    assert code == 0, stderr
    assert "note: resolved 3 extension mismatches, e.g. sheet 'TCGA-0.png' -> 'TCGA-0.tif'" in stdout
    assert stdout.count("extension mismatch") == 1
    assert stdout.strip().endswith("training=0 validation=0 test=3; skipped 0")  # missing folders: empty splits
    assert names(load_datalist(out, "test")) == ["TCGA-0.tif", "TCGA-1.tif", "TCGA-2.tif"]
    assert names(load_datalist(out, "test"), "label") == ["TCGA-0.png", "TCGA-1.png", "TCGA-2.png"]


def test_lvit_without_split_folders_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, stderr = run(lvit, ["--root", str(tmp_path / "empty"), "--out", str(tmp_path / "d.json")], capsys)
    assert code == 1
    assert "none of the LViT split folders" in stderr and not (tmp_path / "d.json").exists()
    code, _, stderr = run(lvit, ["--root", str(tmp_path / "nothere"), "--out", str(tmp_path / "d.json")], capsys)
    assert code == 1 and "not a folder" in stderr


def test_lvit_folder_without_sheet_is_an_error(tmp_path, capsys):
    dataset = make_lvit(tmp_path / "data")
    dataset.annotation.unlink()
    code, _, stderr = convert(dataset, tmp_path / "d.json", capsys)
    assert code == 1 and "Train_Folder: no text sheet found" in stderr


def test_lvit_unlisted_images_are_noted(tmp_path, capsys):
    dataset = make_lvit(tmp_path / "data")
    save_image(tmp_path / "data" / "Train_Folder" / "img" / "extra.png")
    code, stdout, _ = convert(dataset, tmp_path / "d.json", capsys)
    assert code == 0
    assert "1 image(s) in" in stdout and "'extra.png'" in stdout and "skipped 0" in stdout


# ---------------------------------------------------------------- csv layout


def test_prompt_csv_end_to_end(tmp_path, capsys):
    dataset = make_prompt_csv(tmp_path / "qata")
    out = tmp_path / "d.json"
    code, stdout, stderr = convert(dataset, out, capsys)
    assert code == 0, stderr
    assert stdout.strip().endswith("training=4 validation=1 test=1; skipped 0")
    training = load_datalist(out, "training")
    assert names(training) == [f"train_{i}.png" for i in range(4)]
    assert names(training, "label") == [f"mask_train_{i}.png" for i in range(4)]
    assert names(load_datalist(out, "validation"), "label") == ["mask_val_0.png"]


def test_prompt_csv_guidedecoder_mask_names_and_lowercase_folders(tmp_path, capsys):
    """GuideDecoder's QaTa csv lists mask_<image>; folders train/test in lower case."""
    root = tmp_path / "QaTa-COV19-v2"
    for split, count in (("train", 5), ("test", 2)):
        records = []
        for index in range(count):
            save_image(root / split / "Images" / f"covid_{split}{index}.png")
            save_image(root / split / "GTs" / f"mask_covid_{split}{index}.png", channels=1)
            records.append([f"mask_covid_{split}{index}.png", f"Unilateral infection {index}."])
        write_table(root / "prompt" / f"{split}.csv", records)
    out = tmp_path / "d.json"
    code, stdout, stderr = run(prompt_csv, ["--root", str(root), "--out", str(out)], capsys)
    assert code == 0, stderr
    assert "note: no val.csv: took the last 20% of the usable train.csv rows (1 of 5) as validation" in stdout
    assert stdout.strip().endswith("training=4 validation=1 test=2; skipped 0")
    assert names(load_datalist(out, "training")) == [f"covid_train{i}.png" for i in range(4)]
    assert names(load_datalist(out, "validation")) == ["covid_train4.png"]
    assert names(load_datalist(out, "validation"), "label") == ["mask_covid_train4.png"]
    assert names(load_datalist(out, "test"), "label") == ["mask_covid_test0.png", "mask_covid_test1.png"]


def test_prompt_csv_mosmed_three_channel_masks(tmp_path, capsys):
    root = tmp_path / "MosMedDataPlus"
    for split, folder in (("train", "Train"), ("val", "Val"), ("test", "Test")):
        save_image(root / folder / "Images" / f"{split}.png", channels=1)
        save_image(root / folder / "GTs" / f"{split}.png", channels=3)
        write_table(root / "prompt" / f"{split}.csv", [[f"{split}.png", "Lower left lung infected."]])
    out = tmp_path / "d.json"
    code, stdout, stderr = run(prompt_csv, ["--root", str(root), "--out", str(out)], capsys)
    assert code == 0, stderr
    assert stdout.strip().endswith("training=1 validation=1 test=1; skipped 0")
    assert names(load_datalist(out, "validation"), "label") == ["val.png"]


@pytest.mark.parametrize(
    "num_rows, fraction, expected_train, expected_val",
    [(10, None, 8, 2), (10, "0.3", 7, 3), (7, None, 5, 2), (10, "0", 10, 0)],
)
def test_prompt_csv_val_fraction(tmp_path, capsys, num_rows, fraction, expected_train, expected_val):
    dataset = make_prompt_csv(tmp_path / "data", num_train=num_rows, with_val=False)
    extra = ["--val-fraction", fraction] if fraction else []
    out = tmp_path / "d.json"
    code, stdout, stderr = convert(dataset, out, capsys, *extra)
    assert code == 0, stderr
    assert stdout.strip().endswith(f"training={expected_train} validation={expected_val} test=1; skipped 0")
    assert names(load_datalist(out, "training")) == [f"train_{i}.png" for i in range(expected_train)]
    assert names(load_datalist(out, "validation")) == [f"train_{i}.png" for i in range(expected_train, num_rows)]
    assert ("no val.csv" in stdout) == (expected_val > 0)


def test_prompt_csv_val_fraction_with_seed(tmp_path, capsys):
    dataset = make_prompt_csv(tmp_path / "data", num_train=10, with_val=False)
    selections = []
    for run_index in range(2):
        out = tmp_path / f"d{run_index}.json"
        code, stdout, _ = convert(dataset, out, capsys, "--seed", "3")
        assert code == 0 and "training=8 validation=2" in stdout and "a random (seed 3) 20%" in stdout
        selections.append(names(load_datalist(out, "validation")))
    assert selections[0] == selections[1]
    assert sorted(selections[0] + names(load_datalist(out, "training"))) == sorted(f"train_{i}.png" for i in range(10))


def test_prompt_csv_picks_validation_rows_after_checking_their_files(tmp_path, capsys):
    """The last train.csv row has a truncated mask: validation is taken from the usable rows, never left empty."""
    dataset = make_prompt_csv(tmp_path / "data", num_train=5, with_val=False)
    bad_mask = dataset.masks[-1]
    bad_mask.write_bytes(bad_mask.read_bytes()[:40])
    out = tmp_path / "d.json"
    code, stdout, stderr = convert(dataset, out, capsys)
    assert code == 0, stderr
    assert "took the last 20% of the usable train.csv rows (1 of 4) as validation" in stdout
    assert stdout.strip().endswith("training=3 validation=1 test=1; skipped 1 (unreadable mask: 1)")
    assert names(load_datalist(out, "validation")) == ["train_3.png"]
    assert names(load_datalist(out, "training")) == [f"train_{i}.png" for i in range(3)]


def test_prompt_csv_val_csv_without_val_folder(tmp_path, capsys):
    """GuideDecoder-like: val.csv lists images that live in the Train folder."""
    dataset = make_prompt_csv(tmp_path / "data", num_train=3, with_val=False)
    write_table(tmp_path / "data" / "prompt" / "val.csv", [["train_2.png", "validation text"]])
    write_table(dataset.annotation, dataset.records[:2])
    out = tmp_path / "d.json"
    code, stdout, stderr = convert(dataset, out, capsys, "--val-fraction", "0.5")
    assert code == 0, stderr
    assert "--val-fraction ignored" in stderr
    assert "no val folder: val.csv images are looked up in" in stdout
    assert stdout.strip().endswith("training=2 validation=1 test=1; skipped 0")
    assert load_datalist(out, "validation")[0]["text"] == "validation text"


def test_prompt_csv_without_prompt_folder_is_an_error(tmp_path, capsys):
    save_image(tmp_path / "data" / "Train" / "Images" / "a.png")
    code, _, stderr = run(prompt_csv, ["--root", str(tmp_path / "data"), "--out", str(tmp_path / "d.json")], capsys)
    assert code == 1 and "lacks the 'prompt' folder" in stderr


# ---------------------------------------------------------------- medvlsm


def test_medvlsm_default_prompt_is_p9_variant_0(tmp_path, capsys):
    dataset = make_medvlsm(tmp_path / "kvasir")
    out = tmp_path / "d.json"
    code, stdout, stderr = convert(dataset, out, capsys)
    assert code == 0, stderr
    assert stdout.strip().endswith("training=4 validation=1 test=1; skipped 0")
    training = load_datalist(out, "training")
    assert [i["text"] for i in training] == [f"one small train polyp {i}" for i in range(4)]
    assert names(training) == [f"train_{i}.jpg" for i in range(4)]
    assert names(training, "label") == [f"train_{i}.png" for i in range(4)]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--prompt", "p6"], "p6 one small train polyp 0"),
        (["--prompt", "p9", "--variant", "2"], "one small train polyp 0 (variant 2)"),
        (["--prompt", "p7", "--variant", "1"], "polyp v1"),
        (["--prompt", "p1", "--variant", "3"], "polyp"),  # the variant only applies to list prompts
    ],
)
def test_medvlsm_prompt_choice(tmp_path, capsys, extra, expected):
    dataset = make_medvlsm(tmp_path / "kvasir")
    out = tmp_path / "d.json"
    code, _, stderr = convert(dataset, out, capsys, *extra)
    assert code == 0, stderr
    assert load_datalist(out, "training")[0]["text"] == expected


def test_medvlsm_random_variant_is_seeded(tmp_path, capsys):
    dataset = make_medvlsm(tmp_path / "kvasir", num_train=12)
    texts = []
    for run_index in range(2):
        out = tmp_path / f"d{run_index}.json"
        assert convert(dataset, out, capsys, "--variant", "random", "--seed", "1")[0] == 0
        texts.append([i["text"] for i in load_datalist(out, "training")])
    assert texts[0] == texts[1]
    assert len({text.split(" polyp ")[1].split(" ", 1)[-1] for text in texts[0]}) > 1  # several variants used


def test_medvlsm_empty_p0_and_missing_variant(tmp_path, capsys):
    dataset = make_medvlsm(tmp_path / "kvasir")
    code, _, stderr = convert(dataset, tmp_path / "d.json", capsys, "--prompt", "p0")
    assert code == 1 and "no usable item" in stderr and "empty description: 6" in stderr
    assert not (tmp_path / "d.json").exists()
    code, stdout, stderr = convert(dataset, tmp_path / "d.json", capsys, "--variant", "7")
    assert code == 1 and "prompt 'p9' has 3 variant(s), --variant 7 asked" in stderr
    code, _, stderr = convert(dataset, tmp_path / "d.json", capsys, "--prompt", "p5")
    assert code == 1 and "missing prompt: no prompt 'p5'" in stderr


def test_medvlsm_missing_annotation_file_gives_empty_split(tmp_path, capsys):
    dataset = make_medvlsm(tmp_path / "kvasir")
    (tmp_path / "kvasir" / "anns" / "test.json").unlink()
    out = tmp_path / "d.json"
    code, stdout, _ = convert(dataset, out, capsys)
    assert code == 0
    assert "test.json: the test split is empty" in stdout
    assert "1 image(s) in" in stdout  # test_0.jpg is no longer listed
    assert stdout.strip().endswith("training=4 validation=1 test=0; skipped 0")
    assert load_datalist(out, "test") == []


def test_medvlsm_malformed_entry_and_invalid_json(tmp_path, capsys):
    dataset = make_medvlsm(tmp_path / "kvasir")
    entries = json.loads(dataset.annotation.read_text())
    entries.insert(1, {"img_name": "x.jpg"})
    dataset.annotation.write_text(json.dumps(entries))
    code, stdout, stderr = convert(dataset, tmp_path / "d.json", capsys)
    assert code == 0 and f"entry 2 of {dataset.annotation} ('entry 2'): malformed entry: no 'mask_name'" in stderr
    dataset.annotation.write_text("[{")
    code, _, stderr = convert(dataset, tmp_path / "d.json", capsys)
    assert code == 1 and f"{dataset.annotation}: not valid JSON" in stderr


# ---------------------------------------------------------------- bad inputs, every converter


def missing_image(dataset: Dataset) -> tuple[int, str, int]:
    dataset.images[1].unlink()
    return 1, "missing image", len(dataset.records) - 1


def missing_mask(dataset: Dataset) -> tuple[int, str, int]:
    dataset.masks[1].unlink()
    return 1, "missing mask", len(dataset.records) - 1


def truncated_image(dataset: Dataset) -> tuple[int, str, int]:
    data = dataset.images[1].read_bytes()
    dataset.images[1].write_bytes(data[: len(data) // 2])
    return 1, "unreadable image", len(dataset.records) - 1


def row_whose_file_is_absent(dataset: Dataset) -> tuple[int, str, int]:
    kept = len(dataset.records)
    return dataset.append("ghost.png", "a lesion that has no file"), "missing image", kept


def duplicate_id(dataset: Dataset) -> tuple[int, str, int]:
    kept = len(dataset.records)
    return dataset.append(dataset.records[0][0], "listed again"), "duplicate id", kept


def empty_description_nan(dataset: Dataset) -> tuple[int, str, int]:
    dataset.set_text(1, None)
    return 1, "empty description", len(dataset.records) - 1


def empty_description_blank(dataset: Dataset) -> tuple[int, str, int]:
    dataset.set_text(1, "   ")
    return 1, "empty description", len(dataset.records) - 1


def size_mismatch(dataset: Dataset) -> tuple[int, str, int]:
    save_image(dataset.masks[1], 8, 8, channels=1)
    return 1, "image/mask size mismatch", len(dataset.records) - 1


BAD_INPUTS = [
    missing_image,
    missing_mask,
    truncated_image,
    row_whose_file_is_absent,
    duplicate_id,
    empty_description_nan,
    empty_description_blank,
    size_mismatch,
]
MAKERS = {"lvit": make_lvit, "prompt_csv": make_prompt_csv, "medvlsm": make_medvlsm}


@pytest.mark.parametrize("make_bad", BAD_INPUTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("converter", list(MAKERS))
def test_bad_input_is_skipped_and_reported(tmp_path, capsys, converter, make_bad):
    dataset = MAKERS[converter](tmp_path / "data")
    index, reason, kept = make_bad(dataset)
    out = tmp_path / "d.json"
    code, stdout, stderr = convert(dataset, out, capsys)
    assert code == 0, stderr
    assert f"{dataset.location(index)} ('{dataset.records[index][0]}'): {reason}" in stderr
    summary = f"wrote {out}: training={kept} validation=1 test=1; skipped 1 ({reason}: 1)"
    assert stdout.strip().splitlines()[-1] == summary
    training = load_datalist(out, "training")
    assert len(training) == kept
    assert [i["text"] for i in training][0] == dataset.records[0][1]  # a duplicate keeps the first listing


@pytest.mark.parametrize("make_bad", BAD_INPUTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("converter", list(MAKERS))
def test_bad_input_with_strict_fails_and_keeps_old_datalist(tmp_path, capsys, converter, make_bad):
    dataset = MAKERS[converter](tmp_path / "data")
    out = tmp_path / "d.json"
    assert convert(dataset, out, capsys)[0] == 0
    old = out.read_text()
    index, reason, _ = make_bad(dataset)
    code, stdout, stderr = convert(dataset, out, capsys, "--strict")
    assert code != 0
    assert f"{dataset.location(index)} ('{dataset.records[index][0]}'): {reason}" in stderr
    assert "no datalist written" in stderr and "wrote" not in stdout
    assert out.read_text() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json", "data"]
