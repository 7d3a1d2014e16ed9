"""One writer of nnU-Net v2 raw datasets: folder name, layout, dataset.json, case files, staged creation.

Every command that creates a raw dataset uses it: ``nnunet-ext merge`` (:mod:`nnunet_ext.tasks.merge`),
``nnunet-ext convert`` (:mod:`nnunet_ext.challenges.common`) and the synthetic generators
(:mod:`nnunet_ext.datasets`). The layout is nnU-Net's (its ``dataset_format.md``)::

    nnUNet_raw/DatasetXXX_Name/
        dataset.json
        imagesTr/<case>_<XXXX><file_ending>     one file per channel, XXXX = channel number
        labelsTr/<case><file_ending>
        imagesTs/, labelsTs/                    test cases, same naming

Every file goes through :mod:`nnunet_ext.atomic_io` (complete or absent), images through
:mod:`nnunet_ext.image_io`. A new dataset folder is built in a private staging folder beside it and
moved into place at the end (:func:`new_dataset_folder`), so an interrupted run leaves no dataset;
staging folders of killed runs are removed by the next one.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from nnunet_ext import atomic_io, image_io

#: dataset names nnU-Net and shells handle without quoting: letters, digits, '_' and '-'
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
DATASET_JSON = "dataset.json"
#: how :func:`place_file` puts a source file into a dataset
HARDLINK, SYMLINK, COPY = "hardlink", "symlink", "copy"

__all__ = ["COPY", "DATASET_JSON", "HARDLINK", "NAME_PATTERN", "SYMLINK", "count_training_cases",
           "dataset_json", "folder_name", "image_file", "is_valid_name", "label_file", "new_dataset_folder",
           "other_folders_with_id", "place_file", "write_case_arrays", "write_dataset_json"]


def is_valid_name(name: object) -> bool:
    """True for a dataset (or task) name of letters, digits, '_' and '-', starting with a letter or digit."""
    return isinstance(name, str) and NAME_PATTERN.match(name) is not None


def folder_name(dataset_id: int, name: str) -> str:
    """``DatasetXXX_Name``, nnU-Net's folder name (callers check id and name with their own messages)."""
    return f"Dataset{dataset_id:03d}_{name}"


def other_folders_with_id(raw_root: str | os.PathLike, dataset_id: int, name: str) -> list[str]:
    """Entries of ``raw_root`` other than ``name`` with ``name``'s dataset id: nnU-Net finds datasets by the
    ``DatasetXXX_`` prefix and could not tell them apart."""
    raw_root = Path(raw_root)
    if not raw_root.is_dir():
        return []
    prefix = f"Dataset{dataset_id:03d}_"
    return sorted(p.name for p in raw_root.iterdir() if p.name.startswith(prefix) and p.name != name)


def image_file(folder: str | os.PathLike, case: str, channel: int, file_ending: str, split: str = "Tr") -> Path:
    """``<folder>/images<split>/<case>_<channel:04d><file_ending>``; ``split`` is nnU-Net's "Tr" (training) or
    "Ts" (test), or another suffix a converter keeps apart (e.g. "Va")."""
    return Path(folder) / f"images{split}" / f"{case}_{channel:04d}{file_ending}"


def label_file(folder: str | os.PathLike, case: str, file_ending: str, split: str = "Tr") -> Path:
    """``<folder>/labels<split>/<case><file_ending>`` (``split`` as for :func:`image_file`)."""
    return Path(folder) / f"labels{split}" / f"{case}{file_ending}"


def dataset_json(channel_names: Mapping[str, str], labels: Mapping[str, Any], num_training: int, file_ending: str,
                 *, name: str | None = None, description: str | None = None, reference: str | None = None,
                 licence: str | None = None, overwrite_image_reader_writer: str | None = None,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A raw dataset's dataset.json: nnU-Net's keys (those of its ``generate_dataset_json``; the optional
    ones only when given), then ``extra`` (our own sections), in a fixed order."""
    content: dict[str, Any] = {}
    for key, value in (("name", name), ("description", description), ("reference", reference),
                       ("licence", licence)):
        if value is not None:
            content[key] = value
    content.update({"channel_names": dict(channel_names), "labels": dict(labels), "numTraining": num_training,
                    "file_ending": file_ending})
    if overwrite_image_reader_writer is not None:
        content["overwrite_image_reader_writer"] = overwrite_image_reader_writer
    content.update(extra or {})
    return content


def write_dataset_json(folder: str | os.PathLike, content: Mapping[str, Any]) -> None:
    """``<folder>/dataset.json``, written atomically."""
    atomic_io.write_json(Path(folder) / DATASET_JSON, content)


@contextlib.contextmanager
def new_dataset_folder(folder: str | os.PathLike, subfolders: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a private staging folder (with ``subfolders``) that becomes ``folder`` when the block ends.

    An interrupted or failing block leaves no ``folder``. An empty ``folder`` that exists already is
    replaced; the callers refuse a non-empty one before calling this. Staging folders of killed runs
    beside it are removed first.
    """
    folder = Path(folder)
    atomic_io.remove_stale_temporaries(folder.parent)
    with atomic_io.staged_folder(folder) as staging:
        for sub in subfolders:
            (staging / sub).mkdir(parents=True, exist_ok=True)
        yield staging
        if folder.is_dir():
            folder.rmdir()  # only reached when it is empty; fails safely otherwise


def place_file(source: str | os.PathLike, target: str | os.PathLike, mode: str = COPY) -> str:
    """Put ``source`` at ``target``, atomically; returns ``"linked"`` or ``"copied"``.

    ``HARDLINK``: a hard link (atomic by itself), a copy where the filesystem refuses links; ``SYMLINK``:
    a symbolic link to the absolute source; ``COPY``: a copy. The source is never written.
    """
    if mode == SYMLINK:
        atomic_io.link_into_place(source, target)
        return "linked"
    if mode == HARDLINK:
        try:
            os.link(source, target)
            return "linked"
        except OSError:
            pass  # another filesystem, or links not allowed: copy instead
    elif mode != COPY:
        raise ValueError(f"mode must be {HARDLINK!r}, {SYMLINK!r} or {COPY!r}, got {mode!r}")
    atomic_io.write_with(target, lambda temporary: shutil.copyfile(source, temporary))
    return "copied"


def write_case_arrays(folder: str | os.PathLike, case: str, channels: Sequence[np.ndarray],
                      label: np.ndarray | None, spacing_zyx: Sequence[float], file_ending: str,
                      split: str = "Tr") -> None:
    """One case of generated (z, y, x) arrays: a file per channel in ``images<split>``, the label (if any) in
    ``labels<split>`` (:func:`nnunet_ext.image_io.write_volume`; the subfolders are made when missing)."""
    targets = [(array, image_file(folder, case, channel, file_ending, split)) for channel, array in enumerate(channels)]
    if label is not None:
        targets.append((label, label_file(folder, case, file_ending, split)))
    for array, target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        image_io.write_volume(array, target, spacing_zyx)


def count_training_cases(folder: str | os.PathLike, file_ending: str) -> int:
    """Label files in ``labelsTr`` (temporaries and hidden files left out): what numTraining must say for
    nnU-Net's integrity check."""
    labels = Path(folder) / "labelsTr"
    return sum(1 for p in labels.iterdir() if p.name.endswith(file_ending) and not p.name.startswith(".")) \
        if labels.is_dir() else 0
