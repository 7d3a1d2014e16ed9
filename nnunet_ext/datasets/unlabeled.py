"""Unlabelled mode of the synthetic dataset: an ``imagesUnlabeled`` folder for semi-supervised methods.

The images come from the same generator as the labelled ones (``synthetic.make_case``) with case
indices after the training and test cases, so they are new anatomy drawn from the same
distribution, exactly what unlabelled scans of a real dataset are. Their labels are computed by the
generator and thrown away; nothing of them is written. Named ``synth_u000_0000.nii.gz`` ...
(``CASE_XXXX`` like imagesTr, see ``nnunet_ext.unlabeled.convention``).

Same safety rules as ``write_synthetic_dataset``: a complete folder written with the same spec and
count is left as is, anything else already there is refused and never modified, and the folder is
built in a private staging folder and moved into place (:func:`nnunet_ext.raw_dataset.new_dataset_folder`).
"""
from __future__ import annotations

import json
import os
import pathlib

from nnunet_ext import atomic_io, image_io, raw_dataset
from nnunet_ext.datasets.synthetic import (CASE_PREFIX, FILE_ENDING, SyntheticSpec, dataset_folder_name, make_case,
                                           write_synthetic_dataset)
from nnunet_ext.parallel import progress
from nnunet_ext.unlabeled.convention import UNLABELED_IMAGES_FOLDER

__all__ = ["unlabeled_case_identifier", "write_unlabeled_images", "write_semi_supervised_dataset"]

MARKER = ".nnunet_ext_synthetic_unlabeled.json"  # hidden: the convention ignores hidden files


def unlabeled_case_identifier(index: int) -> str:
    """``synth_u000``, ...: never equal to a labelled case name (``synth_000``)."""
    return f"{CASE_PREFIX}_u{index:03d}"


def _marker(spec: SyntheticSpec, num_unlabeled: int) -> dict:
    return {"generator": "nnunet_ext.datasets.unlabeled", "spec": spec.to_json_dict(), "num_unlabeled": num_unlabeled}


def _expected_files(spec: SyntheticSpec, num_unlabeled: int) -> list[str]:
    return [f"{unlabeled_case_identifier(i)}_{c:04d}{FILE_ENDING}"
            for i in range(num_unlabeled) for c in range(spec.num_channels)]


def write_unlabeled_images(raw_root: str | os.PathLike, dataset_id: int, name: str, spec: SyntheticSpec,
                           num_unlabeled: int) -> pathlib.Path:
    """Add ``imagesUnlabeled`` with ``num_unlabeled`` cases to a synthetic dataset written with ``spec``."""
    if isinstance(num_unlabeled, bool) or not isinstance(num_unlabeled, int) or num_unlabeled < 1:
        raise ValueError(f"num_unlabeled={num_unlabeled!r} must be an integer >= 1.")
    dataset = pathlib.Path(raw_root) / dataset_folder_name(dataset_id, name)
    if not (dataset / "dataset.json").is_file():
        raise FileNotFoundError(f"{dataset} has no dataset.json; write the labelled dataset first "
                                f"(write_synthetic_dataset or write_semi_supervised_dataset).")
    folder = dataset / UNLABELED_IMAGES_FOLDER
    if folder.exists():
        try:
            same = json.loads((folder / MARKER).read_text()) == _marker(spec, num_unlabeled)
        except (OSError, ValueError):
            same = False
        if same and all((folder / f).is_file() for f in _expected_files(spec, num_unlabeled)):
            return folder
        if not folder.is_dir() or any(folder.iterdir()):
            raise FileExistsError(f"{folder} already exists and was not written by this generator with the same spec "
                                  f"and count; it was left untouched. Remove it yourself or use another dataset.")

    first = spec.num_training + spec.num_test  # new anatomy: indices no labelled/test case uses
    with raw_dataset.new_dataset_folder(folder) as staging:
        for i in progress(range(num_unlabeled), desc="unlabelled cases"):
            image, _ = make_case(spec, first + i)
            for c, channel in enumerate(image):
                image_io.write_volume(channel, staging / f"{unlabeled_case_identifier(i)}_{c:04d}{FILE_ENDING}",
                                      spec.spacing)
        atomic_io.write_json(staging / MARKER, _marker(spec, num_unlabeled))
    return folder


def write_semi_supervised_dataset(raw_root: str | os.PathLike, dataset_id: int, name: str = "SyntheticAbdomen",
                                  spec: SyntheticSpec = SyntheticSpec(), num_unlabeled: int = 10) -> pathlib.Path:
    """The synthetic dataset (imagesTr/labelsTr/imagesTs/labelsTs) plus ``imagesUnlabeled``; returns its folder."""
    folder = write_synthetic_dataset(raw_root, dataset_id, name, spec)
    write_unlabeled_images(raw_root, dataset_id, name, spec, num_unlabeled)
    return folder
