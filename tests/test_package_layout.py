"""Import rules of the package (issue 14): no module imports another module's private names, and the
bottom-level helpers import nothing above them."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "himix_monai"


def _imports(path: Path) -> list[tuple[str, str]]:
    """``(module, name)`` of every ``from himix_monai... import name`` in ``path`` (also inside functions)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("himix_monai"):
            found.extend((node.module, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.extend((f"{'.' * node.level}{node.module or ''}", alias.name) for alias in node.names)
    return found


def test_no_private_names_imported_across_modules():
    private = [
        f"{path.relative_to(PACKAGE.parent)}: from {module} import {name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for module, name in _imports(path)
        if name.startswith("_")
    ]
    assert private == []


def test_bottom_level_modules_import_nothing_above_them():
    bottom = {
        "errors.py": set(),
        "files.py": {"himix_monai.errors"},
        "config_utils.py": {"himix_monai.errors"},
        "metrics.py": set(),
    }
    wrong = [
        f"{name}: imports {module}"
        for name, allowed in bottom.items()
        for module, _ in _imports(PACKAGE / name)
        if module not in allowed
    ]
    assert wrong == []
    text_transforms = {module for module, _ in _imports(PACKAGE / "transforms" / "text.py")}
    assert not any(module.startswith("himix_monai.networks") for module in text_transforms)


def test_checkpoint_files_and_handlers_are_split():
    """checkpoints.py (file format, checks, loading functions) imports no ignite handler module of the package nor
    MONAI's handlers; the handlers import it, not the other way round."""
    imported = {module for module, _ in _imports(PACKAGE / "checkpoints.py")}
    assert not imported & {"himix_monai.handlers", "himix_monai.visualize", "himix_monai.report_conditions"}
    tree = ast.parse((PACKAGE / "checkpoints.py").read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m and (m.startswith("monai.handlers") or m.startswith("ignite")) for m in modules)
    assert "himix_monai.checkpoints" in {module for module, _ in _imports(PACKAGE / "handlers.py")}


def test_read_path_does_not_import_the_demo_generators():
    """The demo sets are built on the read path (``himix_monai.demo`` imports ``himix_monai.data``), never the other
    way round: reading a user's files must not depend on the synthetic-data and report-writing code."""
    wrong = [
        f"{path.relative_to(PACKAGE.parent)}: imports {module}"
        for folder in ("data", "transforms")
        for path in sorted((PACKAGE / folder).glob("*.py"))
        for module, _ in _imports(path)
        if module.startswith(("himix_monai.demo", "himix_monai.mask_reports"))
    ]
    assert wrong == []
    demo_imports = {module for path in (PACKAGE / "demo").glob("*.py") for module, _ in _imports(path)}
    assert "himix_monai.data.datalist" in demo_imports
