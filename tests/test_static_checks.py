"""Static checks run with the tests, so CI runs them: ruff (lint) on the whole repository's Python,
mypy on the ``nnunet_ext`` package. Both read their settings from ``pyproject.toml`` and come
with the ``test`` extra."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINTED = ("nnunet_ext", "trainers", "architectures", "plans", "tests", "benchmarks", "build_backend", "docs")


def _run(module: str, *arguments: str, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *arguments], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "", "RUFF_CACHE_DIR": str(cache / "ruff"), "MYPY_CACHE_DIR": str(cache / "mypy"),
                               **({"HOME": str(cache)})})


def test_ruff_finds_no_problem(tmp_path):
    assert shutil.which("ruff") or _has_module("ruff"), 'ruff is missing: pip install -e ".[test]"'
    result = _run("ruff", "check", "--no-fix", "--output-format", "concise", *LINTED, cache=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_finds_no_problem_in_the_package(tmp_path):
    assert _has_module("mypy"), 'mypy is missing: pip install -e ".[test]"'
    result = _run("mypy", "--no-error-summary", cache=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_checks_can_fail(tmp_path):
    """The same invocations report a planted problem (an unused import, a wrong return type)."""
    planted = tmp_path / "planted.py"
    planted.write_text("import os\n\n\ndef f() -> int:\n    return 'x'\n")
    assert _run("ruff", "check", "--no-fix", str(planted), cache=tmp_path).returncode != 0
    mypy = _run("mypy", "--no-error-summary", str(planted), cache=tmp_path)
    assert mypy.returncode != 0 and "incompatible return value" in mypy.stdout.lower()


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
