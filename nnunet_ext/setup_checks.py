"""Checks of a user's set-up, shared by ``nnunet-ext doctor`` and the commands that need the folders.

Each check returns findings with a fix the user can paste, rather than raising on the first
problem, so ``doctor`` can report everything at once.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Iterable

from nnunet_ext.compat import NNUNET_PATH_VARIABLES
from nnunet_ext.errors import UserFacingError

OK, WARNING, ERROR = "ok", "warning", "error"
LOW_DISK_GB = 20.0
CRITICAL_DISK_GB = 1.0


@dataclass(frozen=True)
class Finding:
    level: str
    topic: str
    message: str
    fix: str = ""

    def format(self) -> str:
        mark = {OK: "[ ok ]", WARNING: "[warn]", ERROR: "[FAIL]"}[self.level]
        text = f"{mark} {self.topic}: {self.message}"
        return text + (f"\n       fix: {self.fix}" if self.fix else "")


def check_path_variable(name: str, environ=os.environ, must_be_writable: bool = True) -> Finding:
    value = environ.get(name)
    example = f"export {name}=/data/nnUNet/{name.split('_', 1)[1]}"
    if not value:
        return Finding(ERROR, name, "not set", f"{example}  (and add it to your ~/.bashrc; see nnU-Net's "
                                               f"documentation/setting_up_paths.md)")
    if not os.path.isdir(value):
        return Finding(ERROR, name, f"{value} does not exist", f"mkdir -p {value}  (or point {name} elsewhere)")
    if must_be_writable and not os.access(value, os.W_OK | os.X_OK):
        return Finding(ERROR, name, f"{value} is not writable", f"chmod u+w {value}, or {example} to a folder "
                                                               f"you can write")
    return Finding(OK, name, value)


def check_free_disk(name: str, environ=os.environ) -> Finding | None:
    value = environ.get(name)
    if not value or not os.path.isdir(value):
        return None
    free_gb = shutil.disk_usage(value).free / 1024 ** 3
    if free_gb < CRITICAL_DISK_GB:
        return Finding(ERROR, f"disk ({name})", f"only {free_gb:.1f} GB free at {value}", "free some space")
    if free_gb < LOW_DISK_GB:
        return Finding(WARNING, f"disk ({name})", f"{free_gb:.1f} GB free at {value}; preprocessed data and "
                                                  f"checkpoints of a real dataset need tens of GB",
                       "free some space or move the folder")
    return Finding(OK, f"disk ({name})", f"{free_gb:.0f} GB free")


def require_path_variables(names: Iterable[str] = NNUNET_PATH_VARIABLES, environ=os.environ) -> None:
    """Raise a UserFacingError naming each missing/unwritable nnU-Net folder and how to set it."""
    problems = [finding for finding in (check_path_variable(name, environ) for name in names)
                if finding.level == ERROR]
    if problems:
        raise UserFacingError("nnU-Net's folders are not set up:\n" + "\n".join(p.format() for p in problems))
