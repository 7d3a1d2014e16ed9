"""Find and check the raw nnU-Net datasets that go into a merge (read-only: sources are never written).

Checked here, one source at a time, so every problem names the folder and the file: the
dataset.json keys the merge needs, the channel files of every case (``<case>_XXXX<ending>``)
and its label file, and a file ending whose files we can read and write with SimpleITK (the
reader nnU-Net itself uses for these endings). :func:`check_source_files` then decodes every
image and label in full with the reader nnU-Net uses for the source (truncated or corrupt files,
NaN intensities, channels or labels off the case's grid, labels outside dataset.json, a case of
another dimensionality). Checks across sources (same file ending and dimensionality, label
collisions) live in :mod:`nnunet_ext.tasks.merge` and :mod:`nnunet_ext.tasks.label_space`.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnunet_ext.errors import UserFacingError

#: Endings nnU-Net reads with SimpleITKIO (plus plain .nii); merge reads labels and writes
#: remapped labels and zero channels with SimpleITK, keeping each file's geometry.
SUPPORTED_FILE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".gipl")
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_DATASET_FOLDER = re.compile(r"^Dataset(?P<id>\d{3})_(?P<name>.+)$")


class MergeError(UserFacingError, ValueError):
    """A merge that cannot be done as asked; the message names the dataset/file and the fix."""


@dataclass(frozen=True)
class SourceDataset:
    """A checked raw source: its dataset.json and the case ids of imagesTr / imagesTs."""

    folder: Path
    dataset_json: dict[str, Any]
    training: tuple[str, ...]
    test: tuple[str, ...]

    @property
    def name(self) -> str:
        """The folder name, e.g. ``Dataset003_Liver``."""
        return self.folder.name

    @property
    def short_name(self) -> str:
        """The dataset name without ``DatasetXXX_`` (the default task name)."""
        match = _DATASET_FOLDER.match(self.folder.name)
        return match.group("name") if match else self.folder.name

    @property
    def file_ending(self) -> str:
        return self.dataset_json["file_ending"]

    @property
    def channel_names(self) -> dict[str, str]:
        return dict(self.dataset_json.get("channel_names", self.dataset_json.get("modality", {})))

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    def image(self, split: str, case: str, channel: int) -> Path:
        folder = "imagesTr" if split == "train" else "imagesTs"
        return self.folder / folder / f"{case}_{channel:04d}{self.file_ending}"

    def label(self, case: str) -> Path:
        return self.folder / "labelsTr" / f"{case}{self.file_ending}"

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this source's content for re-run checks (dataset.json and case lists)."""
        return {
            "folder": self.name,
            "dataset_json_sha256": _sha256(json.dumps(self.dataset_json, sort_keys=True)),
            "training_cases_sha256": _sha256("\n".join(self.training)),
            "test_cases_sha256": _sha256("\n".join(self.test)),
        }


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def find_dataset_folder(raw_root: Path, dataset_id: int) -> Path:
    """The one folder ``DatasetXXX_*`` of that id in ``raw_root``."""
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise MergeError(f"dataset id {dataset_id!r} must be a whole number in 1..999.")
    prefix = f"Dataset{dataset_id:03d}_"
    found = sorted(p for p in raw_root.iterdir() if p.is_dir() and p.name.startswith(prefix)) \
        if raw_root.is_dir() else []
    if not found:
        raise MergeError(f"no dataset with id {dataset_id}: expected a folder {prefix}<Name> in {raw_root} "
                         f"(nnUNet_raw). Check the id, or set nnUNet_raw to the folder that holds it.")
    if len(found) > 1:
        raise MergeError(f"dataset id {dataset_id} is ambiguous in {raw_root}: {[p.name for p in found]}. "
                         f"nnU-Net needs one folder per id; rename or move the others.")
    return found[0]


def _load_dataset_json(folder: Path) -> dict[str, Any]:
    path = folder / "dataset.json"
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MergeError(f"{path} does not exist; every nnU-Net raw dataset needs one.") from None
    except (OSError, ValueError) as error:
        raise MergeError(f"{path} cannot be read as JSON ({error}); fix the file.") from None
    if not isinstance(content, dict):
        raise MergeError(f"{path} must hold a JSON object.")
    return content


def _case_ids(folder: Path, ending: str, num_channels: int, dataset: str) -> tuple[str, ...]:
    """Case ids of an images folder; every case must have exactly channels 0..num_channels-1."""
    if not folder.is_dir():
        return ()
    channels: dict[str, set[int]] = {}
    for path in folder.iterdir():
        if path.name.startswith(".") or not path.name.endswith(ending):
            continue  # nnU-Net also skips files with other endings
        match = _CHANNEL_SUFFIX.match(path.name[: -len(ending)])
        if match is None:
            raise MergeError(f"{path}: image files must be named <case>_XXXX{ending} (XXXX = channel number). "
                             f"Rename the file in {dataset}.")
        channels.setdefault(match.group("case"), set()).add(int(match.group("channel")))
    expected = set(range(num_channels))
    for case, found in sorted(channels.items()):
        if found != expected:
            missing = sorted(expected - found)
            extra = sorted(found - expected)
            detail = f"missing channel(s) {missing}" if missing else f"unexpected channel(s) {extra}"
            raise MergeError(f"{folder / case}_XXXX{ending}: {detail}; {dataset}/dataset.json declares "
                             f"{num_channels} channel(s). Add the files or fix channel_names.")
    return tuple(sorted(channels))


def read_source(folder: Path) -> SourceDataset:
    """Load and check one source dataset (nothing is written)."""
    dataset_json = _load_dataset_json(folder)
    where = f"{folder / 'dataset.json'}"
    missing = [k for k in ("labels", "file_ending", "numTraining") if k not in dataset_json]
    if "channel_names" not in dataset_json and "modality" not in dataset_json:
        missing.append("channel_names")
    if missing:
        raise MergeError(f"{where} lacks {missing}; nnU-Net v2 needs them (see nnU-Net's dataset_format.md).")
    if "dataset" in dataset_json:
        raise MergeError(f"{where} lists its files in a 'dataset' key; merge needs the standard imagesTr/labelsTr "
                         f"layout. Export {folder.name} into that layout first.")
    ending = dataset_json["file_ending"]
    if ending not in SUPPORTED_FILE_ENDINGS:
        raise MergeError(f"{folder.name} uses file ending {ending!r}; merge supports {list(SUPPORTED_FILE_ENDINGS)} "
                         f"(3D images read and written with SimpleITK). Convert {folder.name} to .nii.gz first.")
    channel_names = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not isinstance(channel_names, dict) or not channel_names or \
            set(channel_names) != {str(i) for i in range(len(channel_names))}:
        raise MergeError(f"{where}: channel_names must map \"0\", \"1\", ... to names, got {channel_names!r}.")
    source = SourceDataset(folder, dataset_json, (), ())
    training = _case_ids(folder / "imagesTr", ending, source.num_channels, folder.name)
    test = _case_ids(folder / "imagesTs", ending, source.num_channels, folder.name)
    if not training:
        raise MergeError(f"{folder / 'imagesTr'} holds no training cases ending in {ending}; nothing to merge.")
    if len(training) != dataset_json["numTraining"]:
        raise MergeError(f"{where} says numTraining={dataset_json['numTraining']} but {folder / 'imagesTr'} holds "
                         f"{len(training)} cases; fix numTraining or the files of {folder.name}.")
    for case in training:
        if not source.label(case).is_file():
            raise MergeError(f"{source.label(case)} is missing: every training case needs a label file. "
                             f"Add it or remove the case's images from {folder.name}.")
    return SourceDataset(folder, dataset_json, training, test)


def check_source_files(source: SourceDataset) -> int:
    """Decode every image and label of ``source`` (imagesTr, labelsTr, imagesTs) with the reader nnU-Net uses
    for it and check each case against its siblings; returns the dataset's dimensionality (2 or 3).

    The dimensionality is that of most cases, so the one odd case is the one named.
    """
    from nnunet_ext import image_checks

    first = source.image("train", source.training[0], 0)
    try:
        reader = image_checks.reader_for(source.dataset_json, first)
    except RuntimeError:  # nnU-Net's lookup by overwrite_image_reader_writer and file ending found nothing
        raise MergeError(f"{source.folder / 'dataset.json'}: nnU-Net has no image reader for overwrite_image_"
                         f"reader_writer {source.dataset_json.get('overwrite_image_reader_writer')!r} / file_ending "
                         f"{source.file_ending!r}; fix those keys.") from None
    allowed = image_checks.dataset_label_values(source.dataset_json)
    found: list[image_checks.ImageInfo] = []
    for split, cases in (("train", source.training), ("test", source.test)):
        for case in cases:
            images = [source.image(split, case, c) for c in range(source.num_channels)]
            label = source.label(case) if split == "train" else None
            found.append(image_checks.check_case(images, reader, label=label, allowed_labels=allowed))
    counts = Counter(info.spatial_dims for info in found)
    dims = max(counts, key=lambda d: (counts[d], d))
    odd = next((info for info in found if info.spatial_dims != dims), None)
    if odd is not None:
        raise MergeError(f"{odd.path}: a {odd.spatial_dims}D image in a {dims}D dataset ({counts[dims]} of "
                         f"{len(found)} cases of {source.name} are {dims}D). Remove the case or convert it to "
                         f"{dims}D.")
    return dims
