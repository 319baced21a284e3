"""Check once that the requirements the model zoo derives from the exported metadata install on Python 3.10.

Not part of the test suite (it needs PyPI): run by hand in the environment the zoo bundle is exported from,

    python tests/integration/zoo_requirements_py310.py

The pins are those ``python -m himix_monai.zoo_bundle`` writes (the running environment's versions of the
project's requirements, see :py:func:`himix_monai.zoo_bundle.zoo_metadata`). The zoo's own
``ci/get_bundle_requirements.py`` (from ``<repo>/../shared/tools/model-zoo-ci``, run unchanged in a scratch
layout, with ``ALLOW_MONAI_RC=true`` as its CPU pre-merge script sets) turns them into a requirements file, which a
Python 3.10 virtual environment resolves with ``pip install --dry-run --ignore-installed --only-binary=:all:
--pre`` (the CPU CI's ``pip install --pre -r``, without downloading torch's multi-GB wheels: pip reads the wheels'
metadata). Prints one JSON line: the interpreter, the requirements, whether they resolve, what pip would install or
its error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NAME = "himix_lesion_segmentation"


def default_interpreter() -> str | None:
    """pyenv's Python 3.10.13, if pyenv has it."""
    try:
        root = subprocess.run(["pyenv", "root"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(root) / "versions" / "3.10.13" / "bin" / "python"
    return str(path) if path.is_file() else None


def zoo_requirements(metadata: dict, zoo_ci: Path, work: Path) -> list[str]:
    """The requirement lines the zoo's ``get_bundle_requirements.py`` writes for ``metadata``."""
    shutil.copytree(zoo_ci / "ci", work / "ci")
    bundle = work / "models" / NAME / "configs"
    bundle.mkdir(parents=True)
    (bundle / "metadata.json").write_text(json.dumps(metadata, indent=4))
    env = {**os.environ, "ALLOW_MONAI_RC": "true"}
    name = subprocess.run(
        [sys.executable, "ci/get_bundle_requirements.py", "--b", NAME], cwd=work, env=env, capture_output=True,
        text=True, check=True,
    ).stdout.strip().splitlines()[-1]  # fmt: skip
    return (work / name).read_text().split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interpreter", default=default_interpreter(), help="a Python 3.10 (default: pyenv 3.10.13)")
    parser.add_argument("--zoo_ci", default=str(REPO.parent / "shared" / "tools" / "model-zoo-ci"))
    parser.add_argument("--metadata", default=str(REPO / "bundle" / "configs" / "metadata.json"))
    args = parser.parse_args()
    if not args.interpreter:
        sys.exit("no Python 3.10 interpreter: give --interpreter /path/to/python3.10")

    from himix_monai.zoo_bundle import zoo_metadata

    metadata = zoo_metadata(json.loads(Path(args.metadata).read_text()))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        requirements = zoo_requirements(metadata, Path(args.zoo_ci), work / "zoo")
        (work / "requirements.txt").write_text("\n".join(requirements) + "\n")
        subprocess.run([args.interpreter, "-m", "venv", str(work / "venv")], check=True)
        python = str(work / "venv" / "bin" / "python")
        version = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                                 capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
        pip = subprocess.run(
            [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--only-binary=:all:", "--pre",
             "--quiet", "--report", str(work / "report.json"), "-r", str(work / "requirements.txt")],
            capture_output=True, text=True,
        )  # fmt: skip
        result = {"python": version, "requirements": requirements, "resolves": pip.returncode == 0}
        if pip.returncode == 0:
            report = json.loads((work / "report.json").read_text())
            installs = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in report["install"]}
            result["would_install"] = len(installs)
            result["resolved"] = {k: installs[k] for k in ("monai", "torch", "numpy") if k in installs}
        else:
            result["error"] = [line for line in pip.stderr.splitlines() if line.strip()][-12:]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
