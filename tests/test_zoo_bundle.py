"""The bundle as the MONAI model zoo and its users run it.

- ``bundle_root`` follows the config file: the bundle runs from its own folder and from the repository root.
- ``python -m himix_monai.zoo_bundle`` on a freshly trained tiny bundle gives a folder that passes the zoo's own
  checks, run unchanged as subprocesses from ``<repo>/../shared/tools/model-zoo-ci`` (``prepare_schema.py``,
  ``verify_bundle.py -m min`` and ``-m full``) in a scratch zoo layout; the inference workflow of that folder
  initialises and passes ``check_properties()`` without any data; and ``python -m monai.bundle run --config_file
  configs/inference.json`` works from inside it, with the code imported from its ``scripts/``.

The zoo's pre-commit hooks need the network to install; of them, only the large-file rule
(``check-added-large-files --maxkb=1024``) is checked here, as file sizes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from monai.bundle import ConfigWorkflow, create_workflow

from himix_monai.data.inference_items import InferenceInputError
from himix_monai.zoo_bundle import ZooBundleError, export_zoo_bundle, pinned_requirements

from tests.test_bundle_evaluate_inference import trained  # noqa: F401  (the shared 1-epoch tiny training)

REPO = Path(__file__).resolve().parents[1]
ZOO_CI = REPO.parent / "shared" / "tools" / "model-zoo-ci"
NAME = "himix_lesion_segmentation"
WEIGHTS_URL = "https://example.invalid/himix_lesion_segmentation/model.pt"  # never fetched: the file is present
TINY_INFERENCE = {"image_encoder": "test_convnext", "image_size": [64, 64]}  # as the `trained` fixture
# What a zoo pull request for this bundle would add to ci/bundle_custom_data.py (argued in the model card): nothing.
ZOO_EXCLUSIONS: dict[str, list[str]] = {}
MAX_KB = 1024  # the zoo's check-added-large-files --maxkb


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} (in {cwd}) failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


# ----------------------------------------------------------------------------------------------------------------
# bundle_root


def _tiny_bundle(folder: Path) -> Path:
    """A bundle whose `initialize` returns its `bundle_root`, with this project's default for it."""
    (folder / "configs").mkdir(parents=True)
    (folder / "configs" / "metadata.json").write_text(json.dumps({"version": "0.0.1"}))
    config = {
        "imports": ["$import himix_monai", "$import himix_monai.config_utils"],
        "bundle_root": "$himix_monai.config_utils.find_bundle_root()",
        "initialize": ["@bundle_root"],
    }
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    return folder / "configs" / "inference.json"


def _bundle_root_of_run(config_file: str) -> str:
    workflow = ConfigWorkflow(config_file=config_file, logging_file=False, workflow_type=None)
    return workflow.initialize()[0]


def test_bundle_root_follows_the_config_file(tmp_path, monkeypatch):
    config = _tiny_bundle(tmp_path / "repo" / "bundle")
    monkeypatch.chdir(tmp_path / "repo")  # from the repository root
    assert _bundle_root_of_run("bundle/configs/inference.json") == "bundle"
    monkeypatch.chdir(tmp_path / "repo" / "bundle")  # from inside the bundle folder, as zoo users run bundles
    assert _bundle_root_of_run("configs/inference.json") == "."
    monkeypatch.chdir(tmp_path)  # from anywhere, with the config's full path
    assert _bundle_root_of_run(str(config)) == str(config.parent.parent)

    from himix_monai.config_utils import find_bundle_root

    # no workflow running (a bare ConfigParser): the working directory decides
    with pytest.raises(FileNotFoundError, match="--bundle_root"):
        find_bundle_root()  # tmp_path holds neither configs/ nor bundle/configs/
    monkeypatch.chdir(tmp_path / "repo")
    assert find_bundle_root() == "bundle"
    monkeypatch.chdir(tmp_path / "repo" / "bundle")
    assert find_bundle_root() == "."


def test_repository_configs_derive_bundle_root():
    for name in ("train.json", "inference.json"):
        config = json.loads((REPO / "bundle" / "configs" / name).read_text())
        assert config["bundle_root"] == "$himix_monai.config_utils.find_bundle_root()", name


# ----------------------------------------------------------------------------------------------------------------
# the model zoo


def test_zoo_export_refuses_to_overwrite_or_to_run_without_weights(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(REPO / "bundle" / "configs", bundle / "configs")
    with pytest.raises(ZooBundleError, match="models/model.pt not found: train the bundle first"):
        export_zoo_bundle(bundle, tmp_path / "out", WEIGHTS_URL)
    assert not (tmp_path / "out").exists()
    (bundle / "models").mkdir()
    (bundle / "models" / "model.pt").write_bytes(b"weights")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("a user's file")
    with pytest.raises(ZooBundleError, match="exists and is not an empty folder"):
        export_zoo_bundle(bundle, tmp_path / "used", WEIGHTS_URL)
    assert (tmp_path / "used" / "keep.txt").read_text() == "a user's file"
    with pytest.raises(ZooBundleError, match="--weights_url is empty"):
        export_zoo_bundle(bundle, tmp_path / "new", " ")


def test_pins_must_satisfy_the_projects_requirements(monkeypatch):
    import importlib.metadata

    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: ["pydicom>=2.4.4,<3", "pytest; extra == 'dev'"])
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.0.2" if name == "pydicom" else real_version(name))
    with pytest.raises(ZooBundleError, match=r"installed pydicom 3.0.2 does not satisfy .*pydicom<3,>=2.4.4"):
        pinned_requirements()
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.4.5")
    assert pinned_requirements() == {"pydicom": "2.4.5"}  # extras (dev tools) are not pinned


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, trained) -> Path:  # noqa: F811
    """A scratch zoo layout (``ci/``, ``models/``) holding the exported bundle of the tiny trained model."""
    if not (ZOO_CI / "ci" / "verify_bundle.py").is_file():
        pytest.skip(f"the model zoo's checks are not at {ZOO_CI} (<repo>/../shared/tools/model-zoo-ci)")
    base = tmp_path_factory.mktemp("zoo")
    source = base / "bundle"  # the repository's bundle after training, with the tiny network's settings
    shutil.copytree(REPO / "bundle", source, ignore=shutil.ignore_patterns("models", "data", "eval", "logs"))
    (source / "models").mkdir()
    shutil.copy2(trained / "models" / "model.pt", source / "models" / "model.pt")
    inference = source / "configs" / "inference.json"
    config = json.loads(inference.read_text())
    config.update(TINY_INFERENCE)
    config["network_def"]["num_heads"] = 4
    inference.write_text(json.dumps(config, indent=4) + "\n")

    root = base / "zoo"
    shutil.copytree(ZOO_CI / "ci", root / "ci")
    for path in (root / "ci").iterdir():
        path.chmod(0o644)
    custom = root / "ci" / "bundle_custom_data.py"
    custom.write_text(
        custom.read_text() + "".join(f"\n{name}.append({NAME!r})\n" for name, names in ZOO_EXCLUSIONS.items())
    )
    (root / "models").mkdir()
    for name in ("meta_schema_20240725.json", "model_info.json"):
        shutil.copy2(ZOO_CI / name, root / "models" / name)
    _run(
        [sys.executable, "-m", "himix_monai.zoo_bundle", "--bundle", str(source), "--output",
         str(root / "models" / NAME), "--weights_url", WEIGHTS_URL],
        cwd=REPO,
    )  # fmt: skip
    return root


@pytest.mark.slow
def test_zoo_bundle_layout_weights_and_pins(zoo):
    bundle = zoo / "models" / NAME
    large = yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"]
    assert [(f["path"], f["url"], f["hash_type"]) for f in large] == [("models/model.pt", WEIGHTS_URL, "sha256")]
    listed = {bundle / f["path"] for f in large}
    too_large = [
        f"{p.relative_to(bundle)}: {p.stat().st_size // 1024} KB"
        for p in bundle.rglob("*")
        if p.is_file() and p not in listed and p.stat().st_size > MAX_KB * 1024
    ]
    assert not too_large, f"files over the zoo's {MAX_KB} KB that large_files.yml does not list: {too_large}"
    assert not (bundle / "data").exists() and not (bundle / "models" / "checkpoint_latest.pt").exists()

    import monai

    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["monai_version"] == monai.__version__
    assert "himix-monai" not in meta["required_packages_version"]  # its code is in scripts/
    assert meta["supported_apps"] and meta["eval_metrics"]["mean_dice"] > 0
    assert json.loads((bundle / "configs" / "inference.json").read_text())["imports"][0] == "$import scripts"

    probe = "import sys; sys.path.insert(0, sys.argv[1]); import scripts, himix_monai.config_utils as m; print(m.__file__)"
    imported = _run([sys.executable, "-c", probe, str(bundle)], cwd=zoo).stdout.strip()
    assert Path(imported).is_relative_to(bundle / "scripts" / "himix_monai")


@pytest.mark.slow
def test_zoo_ci_checks_pass(zoo):
    _run([sys.executable, "ci/prepare_schema.py", "--l", NAME], cwd=zoo)
    assert "metadata format is verified correctly" in _run(
        [sys.executable, "ci/verify_bundle.py", "-b", NAME, "-m", "min"], cwd=zoo
    ).stdout
    full = _run([sys.executable, "ci/verify_bundle.py", "-b", NAME, "-m", "full"], cwd=zoo).stdout
    assert "data shape is verified correctly" in full
    if NAME not in ZOO_EXCLUSIONS.get("exclude_verify_torchscript_list", []):
        assert "export weights into TorchScript module successfully" in full


@pytest.mark.slow
def test_zoo_bundle_inference_initialises_without_data_and_runs_from_its_folder(zoo, trained):  # noqa: F811
    bundle = zoo / "models" / NAME
    workflow = create_workflow(
        workflow_type="inference", config_file=str(bundle / "configs" / "inference.json"), logging_file=False,
        meta_file=str(bundle / "configs" / "metadata.json"),
    )  # fmt: skip
    workflow.initialize()  # no data/demo: MONAI Label and the zoo initialise inference bundles without data
    assert workflow.check_properties() == []
    assert Path(workflow.bundle_root) == bundle
    with pytest.raises(Exception) as info:
        workflow.run()  # nothing to infer: an error naming the missing default datalist, not an empty run
    chain = [info.value, info.value.__cause__]
    assert any(isinstance(e, InferenceInputError) and "datalist.json: datalist file not found" in str(e) for e in chain)

    copy = zoo / "run_from_folder"
    shutil.copytree(bundle, copy)
    (copy / "data" / "demo").mkdir(parents=True)
    shutil.copy2(trained / "data" / "demo" / "datalist.json", copy / "data" / "demo" / "datalist.json")
    _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"], cwd=copy)
    test_cases = json.loads((copy / "data" / "demo" / "datalist.json").read_text())["test"]
    assert len(list((copy / "eval" / "masks").glob("*_mask.png"))) == len(test_cases)
