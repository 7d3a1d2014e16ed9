"""AMOS22 (abdominal multi-organ segmentation, MICCAI 2022) -> nnU-Net v2 raw dataset.

Release layout (zenodo record of amos22): ``dataset.json`` with "training", "validation" and "test"
lists of ``{"image": "./imagesTr/amos_0001.nii.gz", "label": "./labelsTr/amos_0001.nii.gz"}`` and
"labels" ``{"0": "background", "1": "spleen", ..., "15": "prostate/uterus"}``; folders imagesTr,
labelsTr, imagesVa, labelsVa (later release), imagesTs. Case ids <= 500 are CT, > 500 MRI.

Task 1 is CT only, task 2 CT and MRI; ``mri`` is the MRI cases alone (channel "MRI"), so CT and
MRI can be merged as two tasks of one universal dataset (``nnunet-ext merge``), each with its own
normalisation. Labels are taken from the release's json. For task 2 the one
channel holds CT or MRI, so it is not named "CT": nnU-Net would apply its CT (Hounsfield-window)
normalisation to MRI as well; any other name gives per-image z-scoring (nnU-Net's own AMOS task-2
conversion does the same). Validation cases go to training with ``--include-validation``; otherwise
to imagesTs/labelsTs, where they can be predicted and evaluated. Test cases go to imagesTs.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from nnunet_ext.challenges.common import CaseSource, ConversionPlan
from nnunet_ext.errors import UserFacingError

CHALLENGE = "amos22"
CASE_PATTERN = re.compile(r"^amos_\d{4}$")
MAX_CT_ID = 500
NUM_LABELS = 16  # background + 15 organs


TASKS = (1, 2, "mri")
_DESCRIPTIONS = {1: "task 1 (CT)", 2: "task 2 (CT and MRI)", "mri": "MRI cases"}
_CHANNELS = {1: "CT", 2: "either_CT_or_MR", "mri": "MRI"}


def default_name(task: int | str) -> str:
    return "AMOS22MRI" if task == "mri" else f"AMOS22Task{task}"


def parse_task(task: int | str) -> int | str:
    """1, 2 or "mri" from what the CLI or a caller gives ("1", 2, "MRI", ...)."""
    text = str(task).strip().lower()
    if text in ("1", "2"):
        return int(text)
    if text == "mri":
        return "mri"
    raise UserFacingError(f"--task must be 1 (CT only), 2 (CT and MRI) or mri (MRI only), got {task!r}.")


def case_id_of(path: str) -> str:
    """``./imagesTr/amos_0001.nii.gz`` -> ``amos_0001``."""
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem


def is_ct(case_id: str) -> bool:
    return int(case_id.split("_")[1]) <= MAX_CT_ID


def _in_task(task: int | str, case_id: str) -> bool:
    return task == 2 or (task == 1) == is_ct(case_id)


def _entries(release: dict, key: str, json_path: Path) -> list[dict]:
    """Entries of a split as dicts (MSD-style jsons list test images as plain strings)."""
    entries = release.get(key) or []
    if not isinstance(entries, list):
        raise UserFacingError(f"{json_path}: '{key}' must be a list of cases like {{\"image\": "
                              f"\"./imagesTr/amos_0001.nii.gz\", \"label\": \"./labelsTr/amos_0001.nii.gz\"}}.")
    return [entry if isinstance(entry, dict) else {"image": entry} for entry in entries]


def _release_path(src: Path, value) -> Path | None:
    """``src / value`` for a relative path inside the release; None for anything else."""
    if not isinstance(value, str) or not value.strip() or "\n" in value or "\0" in value:
        return None
    relative = Path(value)
    if relative.is_absolute() or ".." in relative.parts:
        return None
    return src / relative


def _labels(release: dict, path: Path) -> dict[str, int]:
    try:
        labels = {str(name): int(value) for value, name in release["labels"].items()}
    except (KeyError, ValueError, AttributeError):
        raise UserFacingError(f"{path}: 'labels' must map label values to names, e.g. "
                              f"{{\"0\": \"background\", \"1\": \"spleen\"}}.") from None
    if sorted(labels.values()) != list(range(len(labels))) or labels.get("background", -1) != 0:
        raise UserFacingError(f"{path}: expected labels 0..N with 0 = background, got {release['labels']}.")
    return labels


def _case(src: Path, json_path: Path, key: str, index: int, entry: dict, split: str,
          labelled: bool) -> tuple[CaseSource | None, tuple[str, str] | None]:
    """One entry of the release's json as a case, or (None, (case id, what is wrong and what to do))."""
    image = _release_path(src, entry.get("image"))
    if image is None:
        return None, (f"{key}[{index}]", f"{json_path}: entry {index} of '{key}' needs an 'image' path inside the "
                                         f"release (like ./imagesTr/amos_0001.nii.gz), got {entry.get('image')!r}")
    case_id = case_id_of(image.name)
    if not CASE_PATTERN.match(case_id):
        return None, (case_id, f"{json_path}: unexpected image name {entry['image']!r}; AMOS22 names are amos_XXXX")
    label = None
    if labelled and entry.get("label") not in (None, ""):
        label = _release_path(src, entry["label"])
        if label is None:
            return None, (case_id, f"{json_path}: the 'label' of {case_id} must be a path inside the release (like "
                                   f"./labelsTr/{case_id}.nii.gz), got {entry['label']!r}")
    elif split == "Tr":
        return None, (case_id, f"{json_path}: {key} case {case_id} has no 'label'; a training case needs one. Add it "
                               f"to the json (./labels{'Tr' if key == 'training' else 'Va'}/{case_id}.nii.gz) or "
                               f"remove the entry")
    missing = [str(p) for p in (image, label) if p is not None and not p.is_file()]
    if missing:
        return None, (case_id, "missing " + ", ".join(missing))
    return CaseSource(case_id, (str(image),), str(label) if label else None, split), None


def plan(src: str | Path, task: int = 2, include_validation: bool = False) -> ConversionPlan:
    """List the cases of the release selected by ``task`` (1: CT, 2: CT+MRI, "mri": MRI)."""
    task = parse_task(task)
    src = Path(src).resolve()
    json_path = src / "dataset.json"
    if not json_path.is_file() or not (src / "imagesTr").is_dir():
        raise UserFacingError(f"{src} does not look like the AMOS22 release: expected dataset.json and imagesTr/ "
                              f"(with labelsTr/, imagesVa/, imagesTs/) in it. Pass the unpacked amos22/ folder.")
    try:
        release = json.loads(json_path.read_text())
    except (OSError, ValueError) as error:
        raise UserFacingError(f"{json_path} cannot be read as JSON ({error}). Restore the release's dataset.json.") \
            from None
    if not isinstance(release, dict) or "training" not in release:
        raise UserFacingError(f"{json_path} has no 'training' list; is this the AMOS22 release's dataset.json?")
    labels = _labels(release, json_path)
    if include_validation and _entries(release, "validation", json_path) and not (src / "labelsVa").is_dir():
        raise UserFacingError(f"--include-validation needs the validation labels in {src / 'labelsVa'}, which the "
                              f"first AMOS22 release did not contain. Download the release with labelsVa, or leave "
                              f"out --include-validation.")
    selections = [("training", "Tr", True), ("validation", "Tr" if include_validation else "Ts", True),
                  ("test", "Ts", False)]
    cases, problems = [], []
    for key, split, labelled in selections:
        for index, entry in enumerate(_entries(release, key, json_path)):
            case, problem = _case(src, json_path, key, index, entry, split, labelled)
            case_id = case.case_id if case is not None else problem[0]
            if CASE_PATTERN.match(case_id) and not _in_task(task, case_id):
                continue
            if case is not None and case_id in {c.case_id for c in cases}:
                case, problem = None, (case_id, f"{json_path}: {case_id} is listed twice; remove one of its entries")
            if problem:
                problems.append(problem)
            else:
                cases.append(case)
    dataset_json = {
        "name": default_name(task),
        "description": f"AMOS22 {_DESCRIPTIONS[task]} converted by nnunet-ext"
                       + (", validation cases in training" if include_validation else ""),
        "reference": "https://amos22.grand-challenge.org/",
        "licence": "CC BY 4.0",
        "channel_names": {"0": _CHANNELS[task]},
        "labels": labels,
    }
    identity = {"challenge": CHALLENGE, "task": task, "include_validation": include_validation}
    return ConversionPlan(CHALLENGE, identity, dataset_json, frozenset(labels.values()), cases, problems, str(src))
