"""
Make a self-contained bundle folder for the MONAI model zoo from a trained bundle.

The repository keeps one copy of the code, the ``himix_monai`` package, which the bundle's configs import as an
installed package. The model zoo cannot install it (it installs only the pinned packages of ``metadata.json``
from PyPI, and ``himix-monai`` is on no registry) but puts a bundle's folder on ``sys.path`` and takes custom
code from its ``scripts/`` package. This command therefore writes, from the repository's bundle folder and the
package that is running it:

- the bundle's files (configs, docs, LICENSE), without run outputs (``data/``, ``eval/``, ``logs/``, training
  checkpoints);
- ``scripts/himix_monai``: the running ``himix_monai`` package, copied at export time, and ``scripts/__init__.py``,
  which makes that copy importable as ``himix_monai``; ``"$import scripts"`` is put first in every config's
  ``imports``. The copy is generated, never committed to this repository, so the repository still has one copy
  of the code, and the bundle carries exactly the code its weights were exported with;
- ``models/model.pt`` and ``large_files.yml`` listing it with the URL given by the user and its SHA-256. The zoo
  never commits ``models/*`` of a bundle (its ``.gitignore``): the weights are uploaded to the URL, and the
  zoo's ``verify_bundle.py`` downloads them unless a file with the listed hash is already there, as it is here;
- ``configs/metadata.json`` with ``monai_version``, ``pytorch_version``, ``numpy_version`` and
  ``required_packages_version`` pinned to the versions installed in the running environment (the project's
  own requirements, read from its installed distribution; ``himix-monai`` itself is left out since its code
  ships in ``scripts/``). Run it in the environment the bundle was tested in.

Examples::

    python -m himix_monai.zoo_bundle --bundle bundle --output /tmp/zoo/models/himix_lesion_segmentation \\
        --weights_url https://example.org/himix/model.pt
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from himix_monai.files import write_text_atomically

__all__ = ["ZooBundleError", "export_zoo_bundle", "pinned_requirements", "zoo_metadata", "main"]

PROJECT_DISTRIBUTION = "himix-monai"
WEIGHTS = "models/model.pt"
HASH_TYPE = "sha256"  # one of the hash types the zoo's download_large_files (monai.apps.download_url) checks
VENDORED_PACKAGE = "himix_monai"
# version keys of metadata.json that the zoo turns into pins of their own (ci/get_bundle_requirements.py)
SEPARATE_PINS = {"monai": "monai_version", "torch": "pytorch_version", "numpy": "numpy_version"}
RUN_OUTPUTS = ("data", "eval", "logs", "models", "__pycache__", "scripts")

SCRIPTS_INIT = '''"""The bundle's code: makes the vendored package in this folder importable as ``himix_monai``.

Written by ``python -m himix_monai.zoo_bundle``, which copied ``himix_monai/`` here from the HiMix-MONAI
repository. The configs import this package first (``"$import scripts"``); the model zoo, MONAI Label and
``python -m monai.bundle run`` from the bundle folder put the bundle folder on ``sys.path``. A ``himix_monai``
that this process has already imported is kept.
"""

import importlib.util
import os
import sys

_PACKAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "himix_monai")

if "himix_monai" not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        "himix_monai", os.path.join(_PACKAGE, "__init__.py"), submodule_search_locations=[_PACKAGE]
    )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["himix_monai"] = _module
    try:
        _spec.loader.exec_module(_module)
    except BaseException:
        del sys.modules["himix_monai"]
        raise
'''


class ZooBundleError(RuntimeError):
    """The bundle cannot be exported: names the file or package concerned and what to do."""


def _file_hash(path: Path) -> str:
    digest = hashlib.new(HASH_TYPE)
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pinned_requirements(distribution: str = PROJECT_DISTRIBUTION) -> dict[str, str]:
    """The installed versions of the runtime requirements of ``distribution``.

    Args:
        distribution: the installed distribution whose requirements are pinned (extras are left out).

    Returns:
        ``{name: version}`` in the order of the distribution's requirements, names as the requirements spell
        them (``monai``, ``torch`` and ``numpy`` included).

    Raises:
        ZooBundleError: when the distribution is not installed, a requirement is not installed, or an installed
            version does not satisfy the project's own requirement.

    Examples::

        pins = pinned_requirements()  # {"torch": "2.14.1", "monai": "1.6.1", ...}
    """
    from packaging.requirements import Requirement

    try:
        requirements = importlib.metadata.requires(distribution) or []
    except importlib.metadata.PackageNotFoundError as err:
        raise ZooBundleError(
            f"the distribution {distribution!r} is not installed, so its requirements cannot be pinned: run "
            "`pip install -e .` in the repository first."
        ) from err
    pins: dict[str, str] = {}
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # extras (dev tools) and other platforms
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError as err:
            raise ZooBundleError(f"{requirement.name} (required by {distribution}) is not installed.") from err
        if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
            raise ZooBundleError(
                f"installed {requirement.name} {version} does not satisfy {distribution}'s requirement "
                f"{requirement}: install a matching version and test again before exporting."
            )
        pins[requirement.name] = version
    return pins


def zoo_metadata(metadata: Mapping[str, Any], pins: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``metadata`` with its version keys pinned for the zoo.

    Args:
        metadata: the bundle's ``metadata.json`` content.
        pins: ``{name: version}``; default :py:func:`pinned_requirements` (the running environment).

    Returns:
        A new dict: ``monai_version``, ``pytorch_version`` and ``numpy_version`` from the pins, the other pins as
        ``required_packages_version`` (the project's own distribution is not among them).

    Examples::

        metadata = zoo_metadata(json.loads(Path("bundle/configs/metadata.json").read_text()))
    """
    remaining = dict(pinned_requirements() if pins is None else pins)
    result = dict(metadata)
    for name, key in SEPARATE_PINS.items():
        if name in remaining:
            result[key] = remaining.pop(name)
    result["required_packages_version"] = remaining
    return result


def _with_scripts_import(config: dict[str, Any]) -> dict[str, Any]:
    imports = config.get("imports")
    if not isinstance(imports, list) or "$import scripts" in imports:
        return config
    return {**config, "imports": ["$import scripts", *imports]}


def _write_text(path: Path, text: str) -> None:
    write_text_atomically(path, text)


def _write_json(path: Path, content: Any) -> None:
    _write_text(path, json.dumps(content, indent=4) + "\n")  # as the zoo's pretty-format-json hook writes JSON


def export_zoo_bundle(
    bundle: str | os.PathLike, output: str | os.PathLike, weights_url: str, package: str | os.PathLike | None = None
) -> Path:
    """Write a zoo-ready copy of ``bundle`` to ``output`` (see the module docstring for what it holds).

    Args:
        bundle: the repository's bundle folder, with a trained ``models/model.pt``.
        output: the folder to create, e.g. ``<zoo>/models/himix_lesion_segmentation``; it must not exist or be
            empty (nothing is overwritten).
        weights_url: where ``models/model.pt`` will be downloadable, written to ``large_files.yml``.
        package: the ``himix_monai`` package folder to vendor; default the one running this.

    Returns:
        The output folder.

    Raises:
        ZooBundleError: a missing bundle file or weights, an output folder that is not empty, an empty URL,
            or requirements that cannot be pinned (see :py:func:`pinned_requirements`).

    Examples::

        export_zoo_bundle("bundle", "/tmp/zoo/models/himix_lesion_segmentation", "https://example.org/model.pt")
    """
    import yaml

    source, target = Path(bundle), Path(output)
    package = Path(package) if package is not None else Path(__file__).resolve().parent
    metadata_file = source / "configs" / "metadata.json"
    if not metadata_file.is_file():
        raise ZooBundleError(f"{metadata_file} not found: --bundle must be the bundle folder (configs/, models/).")
    weights = source / WEIGHTS
    if not weights.is_file():
        raise ZooBundleError(f"{weights} not found: train the bundle first (the zoo bundle carries its weights).")
    if not str(weights_url or "").strip():
        raise ZooBundleError("--weights_url is empty: give the URL where models/model.pt will be downloadable.")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ZooBundleError(f"{target} exists and is not an empty folder: give a new output folder.")
    pins = pinned_requirements()  # before anything is written

    target.mkdir(parents=True, exist_ok=True)
    for entry in sorted(source.iterdir()):
        if entry.name in RUN_OUTPUTS or entry.name.startswith("."):
            continue
        if entry.is_dir():
            shutil.copytree(entry, target / entry.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(entry, target / entry.name)
    for config_file in sorted((target / "configs").rglob("*.json")):
        if config_file.name != "metadata.json":
            config = json.loads(config_file.read_text(encoding="utf-8"))
            _write_json(config_file, _with_scripts_import(config))

    shutil.copytree(
        package, target / "scripts" / VENDORED_PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    _write_text(target / "scripts" / "__init__.py", SCRIPTS_INIT)

    (target / "models").mkdir()
    shutil.copy2(weights, target / WEIGHTS)
    large_files = {
        "large_files": [{"path": WEIGHTS, "url": weights_url, "hash_val": _file_hash(weights), "hash_type": HASH_TYPE}]
    }
    _write_text(target / "large_files.yml", yaml.safe_dump(large_files, sort_keys=False))

    _write_json(target / "configs" / "metadata.json", zoo_metadata(json.loads(metadata_file.read_text("utf-8")), pins))
    return target


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m himix_monai.zoo_bundle --bundle bundle --output DIR --weights_url URL``.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(prog="python -m himix_monai.zoo_bundle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="bundle", help="the trained bundle folder (default: bundle)")
    parser.add_argument("--output", required=True, help="the new zoo bundle folder, e.g. <zoo>/models/<name>")
    parser.add_argument("--weights_url", required=True, help="where models/model.pt will be downloadable")
    args = parser.parse_args(argv)
    try:
        target = export_zoo_bundle(args.bundle, args.output, args.weights_url)
    except ZooBundleError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"zoo bundle written to {target}; upload {target / WEIGHTS} to {args.weights_url}")


if __name__ == "__main__":
    main()
