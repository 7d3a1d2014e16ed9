"""The unlabelled-image convention: folder, file naming and the preprocessed layout.

Raw (written by the user, never modified by us)::

    nnUNet_raw/DatasetXXX_Name/
        imagesTr/ labelsTr/ dataset.json          nnU-Net's own
        imagesUnlabeled/                          ours: CASE_XXXX<file_ending>, one file per channel,
            case_u001_0000.nii.gz                 the channels and file ending of dataset.json,
            case_u001_0001.nii.gz                 exactly like imagesTr (but no labels anywhere)

Preprocessed (written by ``nnunet-ext preprocess-unlabeled``)::

    nnUNet_preprocessed/DatasetXXX_Name/
        nnUNetPlans_3d_fullres/                   nnU-Net's labelled cases, never touched by us
        nnUNetPlans_3d_fullres_unlabeled/         <data_identifier>_unlabeled: one case per image, in
                                                  the format of the plans' preprocessor (blosc2 in 2.8)
        nnUNetPlans_3d_fullres_unlabeled.json     manifest: cases, plans, stamp of the plans used

Why a separate folder: nnU-Net's splits, training and validation list every case of the labelled
folder; unlabelled cases must never show up there. The manifest sits next to the folder and not in
it because nnU-Net infers a folder's storage format from the file endings inside it.

Case names must be unique across ``imagesTr`` and ``imagesUnlabeled``: an unlabelled copy of a
labelled (possibly validation) image would leak it into training unnoticed. File names may hold
letters, digits and ``. _ - +`` only: no newlines, quotes, ``$(...)`` or other characters a shell
or a line-based log would interpret.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from nnunet_ext.errors import UserFacingError

UNLABELED_IMAGES_FOLDER = "imagesUnlabeled"
UNLABELED_SUFFIX = "_unlabeled"
DOCS_PAGE = "docs page how-to/unlabeled-data"


class UnlabeledDataError(UserFacingError):
    """A problem with the unlabelled images or their preprocessing; the message says how to fix it."""


@dataclass(frozen=True)
class UnlabeledCase:
    """One unlabelled image: its case identifier and its channel files in channel order."""

    identifier: str
    files: tuple[Path, ...]


def unlabeled_preprocessed_folder(preprocessed_dataset_folder: str | Path, data_identifier: str) -> Path:
    """``<preprocessed>/<DatasetX>/<data_identifier>_unlabeled``, next to nnU-Net's labelled folder."""
    return Path(preprocessed_dataset_folder) / f"{data_identifier}{UNLABELED_SUFFIX}"


def manifest_path(unlabeled_folder: str | Path) -> Path:
    """The manifest of an unlabelled folder: same name plus ``.json``, next to it (not inside)."""
    folder = Path(unlabeled_folder)
    return folder.with_name(folder.name + ".json")


def num_channels(dataset_json: dict) -> int:
    """Input channels of a dataset (``channel_names``, or ``modality`` in converted v1 datasets)."""
    channels = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not channels:
        raise UnlabeledDataError("dataset.json has no 'channel_names'; it is not an nnU-Net v2 dataset.json.")
    return len(channels)


_NAME = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def list_unlabeled_cases(raw_dataset_folder: str | Path, dataset_json: dict) -> list[UnlabeledCase]:
    """Every case in ``imagesUnlabeled``, checked against the convention; errors name file and fix.

    Hidden files (``.DS_Store``, editor swap files) are ignored; anything else that does not follow
    the naming is an error rather than silently skipped, since a skipped image is a silently smaller
    unlabelled set.
    """
    folder = Path(raw_dataset_folder) / UNLABELED_IMAGES_FOLDER
    if not folder.is_dir():
        raise UnlabeledDataError(
            f"No {UNLABELED_IMAGES_FOLDER} folder in {Path(raw_dataset_folder)}. Put the unlabelled images in "
            f"{folder}, named and channelled like imagesTr (CASE_0000{dataset_json.get('file_ending', '.nii.gz')}, "
            f"one file per channel; see the {DOCS_PAGE}).")
    ending = dataset_json.get("file_ending")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise UnlabeledDataError(f"dataset.json has no valid 'file_ending' (got {ending!r}); it is not an nnU-Net v2 "
                                 f"dataset.json. Add e.g. \"file_ending\": \".nii.gz\" and plan the dataset again.")
    channels = num_channels(dataset_json)
    expected = ", ".join(f"CASE_{c:04d}{ending}" for c in range(min(channels, 3))) + (", ..." if channels > 3 else "")
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        _check_name_characters(path)
        if not path.is_file() or not path.name.endswith(ending):
            raise UnlabeledDataError(
                f"{path} is not a{'n image' if path.is_file() else ' file'} with the dataset's file ending "
                f"{ending!r}. {UNLABELED_IMAGES_FOLDER} may only hold images named {expected}; move it elsewhere.")
        match = _NAME.match(path.name[: -len(ending)])
        if match is None:
            raise UnlabeledDataError(
                f"{path.name} in {folder} lacks the 4-digit channel index. Rename it to "
                f"{path.name[: -len(ending)]}_0000{ending} (files are CASE_XXXX{ending}, XXXX = channel, as in "
                f"imagesTr).")
        case, channel = match.group("case"), int(match.group("channel"))
        if case.endswith("_seg"):
            raise UnlabeledDataError(
                f"{path.name}: case names may not end in '_seg' (nnU-Net's preprocessed format reserves it for "
                f"segmentations). Rename the case, e.g. {case[:-4]}_img_{channel:04d}{ending}.")
        if channel >= channels:
            raise UnlabeledDataError(
                f"{path} has channel {channel:04d}, but dataset.json lists {channels} channel(s) "
                f"({_channel_names(dataset_json)}), so the indices run 0000 to {channels - 1:04d}. Unlabelled images "
                f"need exactly the channels of imagesTr; rename or remove this file.")
        found.setdefault(case, {})[channel] = path
    if not found:
        raise UnlabeledDataError(f"{folder} holds no images. Put the unlabelled images there ({expected}).")
    cases = []
    for case, files in sorted(found.items()):
        missing = [c for c in range(channels) if c not in files]
        if missing:
            names = ", ".join(f"{case}_{c:04d}{ending}" for c in missing)
            raise UnlabeledDataError(
                f"Case {case!r} in {folder} lacks channel file(s) {names}: dataset.json lists {channels} channel(s) "
                f"({_channel_names(dataset_json)}) and every case needs all of them, as in imagesTr.")
        cases.append(UnlabeledCase(case, tuple(files[c] for c in range(channels))))
    return cases


#: characters a case name may hold besides letters and digits: file names of unlabelled images end up in
#: preprocessed file names, manifests, logs and (through them) job scripts and shells
SAFE_NAME_PUNCTUATION = "._-+"


def _check_name_characters(path: Path) -> None:
    """Refuse file names with control characters (a newline would split every log line and listing) or
    characters a shell interprets (quotes, ``$``, backquotes, ``;``, ...), naming them and the fix."""
    bad = sorted({c for c in path.name if not (c.isalnum() or c in SAFE_NAME_PUNCTUATION)})
    if bad:
        raise UnlabeledDataError(
            f"{ascii(str(path))}: the file name holds {', '.join(ascii(c) for c in bad)}, which case names may not "
            f"contain (they become preprocessed file names and appear in logs and job scripts). Rename it using "
            f"letters, digits and {' '.join(SAFE_NAME_PUNCTUATION)} only, e.g. "
            f"{ascii(''.join(c if c.isalnum() or c in SAFE_NAME_PUNCTUATION else '_' for c in path.name))}.")


def check_unique_case_names(unlabeled: Iterable[str], labeled: Iterable[str], folder: str | Path) -> None:
    """Refuse unlabelled case names that are also labelled cases (see the module docstring)."""
    clash = sorted(set(unlabeled) & set(labeled))
    if clash:
        shown = ", ".join(clash[:5]) + (f" and {len(clash) - 5} more" if len(clash) > 5 else "")
        raise UnlabeledDataError(
            f"{Path(folder) / UNLABELED_IMAGES_FOLDER} has case name(s) {shown} that are also labelled cases in "
            f"imagesTr. If they are the same images they would leak labelled (validation) cases into the unlabelled "
            f"set; remove them. If they are different images, rename them (e.g. prefix 'u_').")


def _channel_names(dataset_json: dict) -> str:
    channels = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    return ", ".join(f"{k}: {v}" for k, v in channels.items())
