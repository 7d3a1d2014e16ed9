"""Helpers shared by the tests of nnunet_ext.challenges (kept out of conftest: used by five files only)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_ext.cli.main import main


def tree_digest(folder: Path) -> dict[str, str]:
    """Relative path -> content hash (symlinks by their target) of every file under ``folder``."""
    digest = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            digest[str(path.relative_to(folder))] = "link:" + str(path.readlink())
        elif path.is_file():
            digest[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def read_array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def convert(monkeypatch, raw: Path, *arguments) -> int:
    """``nnunet-ext convert ...`` in this process with nnUNet_raw = raw; returns the exit status."""
    raw.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("nnUNet_raw", str(raw))
    return main(["convert", *map(str, arguments)])


def predictions_like(folder: Path, references: dict, make_labels) -> Path:
    """nnU-Net-style prediction folder: <case>.nii.gz on each test image's grid, plus nnU-Net's json files."""
    folder.mkdir()
    rng = np.random.default_rng(1)
    for case, image in references.items():
        reference = sitk.ReadImage(str(image))
        prediction = sitk.GetImageFromArray(make_labels(rng))
        prediction.CopyInformation(reference)
        sitk.WriteImage(prediction, str(folder / f"{case}.nii.gz"), True)
    for extra in ("dataset.json", "plans.json", "predict_from_raw_data_args.json"):
        (folder / extra).write_text("{}")
    return folder
