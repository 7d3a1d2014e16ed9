"""Hostile-input checks shared by the tests of every subcommand and trainer entry point.

A refusal is good when: the exit code is non-zero, the message names the problem (the caller's
needles), no traceback is printed, every input is byte-identical afterwards, and nothing partial is
left in the output (the output is absent, or exactly what it was before).

``run_cli`` runs ``nnunet-ext`` in-process (fast; an exception other than our one-line
UserFacingError fails the check, because the real CLI would print its traceback);
``run_command`` runs any command as a subprocess, as a user types it.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from nnunet_ext.atomic_io import is_temporary


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(argv: Sequence[str], env: dict[str, str] | None = None) -> Outcome:
    """``nnunet-ext ARGV`` in this process, with ``env`` applied to os.environ for the call."""
    from nnunet_ext.cli.main import main

    saved = dict(os.environ)
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as exit_:  # argparse refusals
                code = exit_.code if isinstance(exit_.code, int) else 1
            except Exception:  # what the real CLI would show as a traceback
                err.write(traceback.format_exc())
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return Outcome(int(code or 0), out.getvalue(), err.getvalue())


def run_command(command: Sequence[str], env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
                timeout: float = 600) -> Outcome:
    completed = subprocess.run(list(command), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return Outcome(completed.returncode, completed.stdout, completed.stderr)


def snapshot(*roots: str | os.PathLike) -> dict[str, str]:
    """Relative path -> sha256 (``<dir>`` for folders, ``-> target`` for links) of everything under the roots.

    Lock files (``.*.lock``) are left out: they are the mechanism, not output.
    """
    state: dict[str, str] = {}
    for root in map(Path, roots):
        if not root.exists() and not root.is_symlink():
            continue
        paths = [root] + sorted(root.rglob("*")) if root.is_dir() else [root]
        for path in paths:
            if path.name.startswith(".") and path.name.endswith(".lock"):
                continue
            key = f"{root}::{path.relative_to(root) if path != root else '.'}"
            if path.is_symlink():
                state[key] = "-> " + os.readlink(path)
            elif path.is_dir():
                state[key] = "<dir>"
            else:
                state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def temporaries(*roots: str | os.PathLike) -> list[Path]:
    """Temporary files or staging folders of our write path left under the roots."""
    found = []
    for root in map(Path, roots):
        if root.is_dir():
            found += [p for p in root.rglob("*") if is_temporary(p)]
    return found


def assert_refused(outcome: Outcome, needles: Iterable[str], *, before: dict[str, str] | None = None,
                   after: dict[str, str] | None = None, absent: Iterable[str | os.PathLike] = (),
                   clean: Iterable[str | os.PathLike] = ()) -> None:
    """The checks of a good refusal (see the module docstring); ``before``/``after`` are snapshots of the
    inputs and of any pre-existing output, ``absent`` outputs that must not exist, ``clean`` folders that
    must hold no temporaries of ours."""
    text = outcome.output
    assert outcome.returncode != 0, f"exit code 0 for hostile input; output:\n{text}"
    assert "Traceback (most recent call last)" not in text, f"traceback instead of a message:\n{text}"
    lowered = text.lower()
    for needle in needles:
        assert needle.lower() in lowered, f"message does not mention {needle!r}:\n{text}"
    if before is not None:
        assert after == before, "inputs or existing outputs changed: " + ", ".join(
            sorted(k for k in set(before) | set(after or {}) if (after or {}).get(k) != before.get(k)))[:2000]
    for path in absent:
        assert not Path(path).exists(), f"partial output left at {path}"
    left = temporaries(*clean)
    assert not left, f"temporary files left: {left}"
