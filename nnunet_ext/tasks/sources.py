"""Find and check the raw nnU-Net datasets that go into a merge (read-only: sources are never written).

Checked here, one source at a time, so every problem names the folder and the file: the
dataset.json keys the merge needs, the channel files of every case (``<case>_XXXX<ending>``)
and its label file, and an image reader/writer nnU-Net has for the source (dataset.json's
``overwrite_image_reader_writer`` or the file ending: SimpleITKIO, NibabelIO, NaturalImage2DIO,
...; merge reads and writes through it, :mod:`nnunet_ext.image_io`). :func:`check_case_files` then
decodes every image and label in full with that reader (truncated or corrupt files, NaN
intensities, channels or labels off the case's grid, labels outside dataset.json) and
:func:`dimensionality` finds a case of another dimensionality. Checks across sources (same file
ending, reader and dimensionality, label collisions) live in :mod:`nnunet_ext.tasks.merge` and
:mod:`nnunet_ext.tasks.label_space`.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from nnunet_ext.errors import UserFacingError

if TYPE_CHECKING:
    from nnunet_ext.image_checks import ImageInfo

#: Reader/writers merge cannot carry over: Tiff3DIO keeps each case's spacing in a ``<case>.json`` beside
#: its images, which a merged case (new name) would lack.
UNSUPPORTED_READERS = ("Tiff3DIO",)
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

    def reader_writer(self) -> Any:
        """The image reader/writer nnU-Net uses for this dataset (overwrite_image_reader_writer or file ending)."""
        from nnunet_ext import image_io

        try:
            return image_io.reader_writer(self.dataset_json, self.image("train", self.training[0], 0)
                                          if self.training else f"case{self.file_ending}")
        except RuntimeError:  # nnU-Net's lookup by overwrite_image_reader_writer and file ending found nothing
            raise MergeError(f"{self.folder / 'dataset.json'}: nnU-Net has no image reader for overwrite_image_"
                             f"reader_writer {self.dataset_json.get('overwrite_image_reader_writer')!r} / "
                             f"file_ending {self.file_ending!r}; fix those keys.") from None

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
    if not isinstance(ending, str) or not ending.startswith("."):
        raise MergeError(f"{where}: file_ending must be a file ending such as \".nii.gz\", got {ending!r}.")
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
    source = SourceDataset(folder, dataset_json, training, test)
    reader = type(source.reader_writer()).__name__
    if reader in UNSUPPORTED_READERS:
        raise MergeError(f"{folder.name} is read with {reader}, which keeps each case's spacing in a <case>.json "
                         f"beside its images; merge cannot carry those over yet. Convert {folder.name} to .nii.gz "
                         f"(or .nrrd/.mha) first.")
    return source


@dataclass(frozen=True)
class CaseCheck:
    """One case to decode and check: its channel files, its label (None for a test case), the label values
    the source declares and the source's reader/writer. Picklable (merge checks in worker processes)."""

    images: tuple[Path, ...]
    label: Path | None
    allowed_labels: frozenset[int] | None
    reader_writer: Any


def case_checks(source: SourceDataset) -> list[CaseCheck]:
    """Every case of ``source`` (imagesTr with its label, then imagesTs), to pass to :func:`check_case_files`."""
    from nnunet_ext import image_checks

    reader = source.reader_writer()
    values = image_checks.dataset_label_values(source.dataset_json)
    allowed = frozenset(values) if values is not None else None
    return [CaseCheck(tuple(source.image(split, case, c) for c in range(source.num_channels)),
                      source.label(case) if split == "train" else None, allowed, reader)
            for split, cases in (("train", source.training), ("test", source.test)) for case in cases]


def check_case_files(check: CaseCheck) -> ImageInfo:
    """Decode every file of one case in full and check it against its siblings; its first channel's info."""
    from nnunet_ext import image_checks

    return image_checks.check_case(list(check.images), check.reader_writer, label=check.label,
                                   allowed_labels=check.allowed_labels)


def dimensionality(source: SourceDataset, found: Sequence[ImageInfo]) -> int:
    """The dimensionality (2 or 3) of most of ``source``'s checked cases; refuses the first odd case, so the
    one odd case is the one named."""
    counts = Counter(info.spatial_dims for info in found)
    dims = max(counts, key=lambda d: (counts[d], d))
    odd = next((info for info in found if info.spatial_dims != dims), None)
    if odd is not None:
        raise MergeError(f"{odd.path}: a {odd.spatial_dims}D image in a {dims}D dataset ({counts[dims]} of "
                         f"{len(found)} cases of {source.name} are {dims}D). Remove the case or convert it to "
                         f"{dims}D.")
    return dims


def check_source_files(source: SourceDataset) -> int:
    """Decode every image and label of ``source`` (imagesTr, labelsTr, imagesTs) with the reader nnU-Net uses
    for it and check each case against its siblings; returns the dataset's dimensionality (2 or 3)."""
    return dimensionality(source, [check_case_files(check) for check in case_checks(source)])
