"""nnU-Net's internals are reached only through ``nnunet_ext/compat.py``.

nnU-Net's trainer API changes in minor releases; when every import of ``nnunetv2`` lives in one
module, a new release is adapted in one place. This test reads every module of the package
(``nnunet_ext/``, ``trainers/``, ``architectures/``, ``plans/``) and fails on any import of
``nnunetv2`` outside compat, naming the file and line.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ("nnunet_ext", "trainers", "architectures", "plans")
THE_BOUNDARY = ROOT / "nnunet_ext" / "compat.py"
INTERNAL = "nnunetv2"


def package_modules() -> list[Path]:
    return sorted(path for folder in PACKAGE_FOLDERS for path in (ROOT / folder).rglob("*.py"))


def _is_internal(module: str | None) -> bool:
    return module is not None and (module == INTERNAL or module.startswith(INTERNAL + "."))


def nnunet_imports(source: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of nnunetv2 in ``source``: import statements and
    ``importlib.import_module("nnunetv2...")`` / ``__import__`` calls with a literal name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if _is_internal(alias.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _is_internal(node.module):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("import_module", "__import__") and _is_internal(str(node.args[0].value)):
                found.append((node.lineno, str(node.args[0].value)))
    return found


def test_the_scanner_finds_every_form_of_import():
    source = ("import nnunetv2\nimport os, nnunetv2.paths as p\nfrom nnunetv2.run import x\n"
              "def f():\n    from nnunetv2 import y\n    importlib.import_module('nnunetv2.z')\n"
              "from . import nnunetv2_like\nimport nnunetv2x\nfrom nnunet_ext import compat\n")
    assert nnunet_imports(source) == [(1, "nnunetv2"), (2, "nnunetv2.paths"), (3, "nnunetv2.run"),
                                      (5, "nnunetv2"), (6, "nnunetv2.z")]


def test_compat_is_found_and_imports_nnunet():
    assert THE_BOUNDARY in package_modules()
    assert nnunet_imports(THE_BOUNDARY.read_text()), "the scanner would pass an empty tree"


@pytest.mark.parametrize("module", [p for p in package_modules() if p != THE_BOUNDARY],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_but_compat_imports_nnunet_internals(module: Path):
    imports = nnunet_imports(module.read_text())
    assert not imports, "\n".join(f"{module.relative_to(ROOT)}:{line} imports {name}: go through nnunet_ext.compat"
                                  for line, name in imports)
