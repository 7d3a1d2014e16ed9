"""AMOS22 (abdominal multi-organ segmentation, MICCAI 2022) -> nnU-Net v2 raw dataset.

Two release forms are read (sources in docs/how-to/challenges/amos22.md):

- the Zenodo release (record 7262581): ``dataset.json`` with "training", "validation" and "test" lists
  of ``{"image": "./imagesTr/amos_0001.nii.gz", "label": "./labelsTr/amos_0001.nii.gz"}`` and "labels"
  ``{"0": "background", "1": "spleen", ..., "15": "prostate/uterus"}``; folders imagesTr, labelsTr,
  imagesVa, labelsVa, imagesTs (its readme: 240 training scans, 120 validation scans with labels for
  model selection, 120 test scans; ids below 500 are CT, the others MRI). nnU-Net's own conversion
  scripts (``Dataset218_Amos2022_task1.py``, ``Dataset219_Amos2022_task2.py``) read the same keys.
- the first-stage release of the challenge: ``task1_dataset.json`` and ``task2_dataset.json`` (same
  keys) beside imagesTr, labelsTr and imagesTs. Its imagesTs are the images of the validation phase
  (amos_0008, the example of the organisers' evaluation page, is a validation case of the Zenodo
  release), so its "test" cases are converted as validation cases, without labels.

Cases go to imagesTr/labelsTr (training), imagesVa (validation; with labelsVa where the release has
the labels, so a validation submission can be built and scored locally) and imagesTs (test): the
validation images, which the validation phase scores, are never mixed with the test images.
``--include-validation`` trains on the labelled validation cases instead.

Task 1 is CT only, task 2 CT and MRI; ``mri`` is the MRI cases alone (channel "MRI"), so CT and
MRI can be merged as two tasks of one universal dataset (``nnunet-ext merge``), each with its own
normalisation. For task 2 the one channel holds CT or MRI, so it is not named "CT": nnU-Net would
apply its CT (Hounsfield-window) normalisation to MRI as well; any other name gives per-image
z-scoring (nnU-Net's own AMOS task-2 conversion does the same).

Submission: the validation phase takes one zip holding ``results/amos_XXXX.nii.gz``, matched one-to-one
with the validation images (100 for task 1, 120 for task 2), anything else is invalid
(amos22.grand-challenge.org/Evaluation/); the Zenodo readme sends test predictions to the same
submission page. The 2022 test phase ran algorithm containers; its input/output interface is not
stated on the pages found, see :func:`container_interface`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from nnunet_ext.challenges.common import FILE_ENDING, CaseSource, ConversionPlan
from nnunet_ext.challenges.definition import ContainerInterface, InputSlot, SubmissionFormat
from nnunet_ext.errors import UserFacingError

CHALLENGE = "amos22"
CASE_PATTERN = re.compile(r"^amos_\d{4}$")
MAX_CT_ID = 500
NUM_LABELS = 16  # background + 15 organs
RELEASE_JSON = "dataset.json"
FIRST_STAGE_JSONS = {1: "task1_dataset.json", 2: "task2_dataset.json", "mri": "task2_dataset.json"}
EVALUATION_PAGE = "https://amos22.grand-challenge.org/Evaluation/"
#: Validation-phase cases per task (evaluation page: "100 preds for task1, 120 preds for task2").
VALIDATION_CASES = {"1": 100, "2": 120}
#: Changed from 1 when validation cases moved from imagesTs to imagesVa: a folder of the old layout is refused.
LAYOUT_VERSION = 2

#: "labels" of the release's json, spelling as released ("arota", "postcava"), as third-party conversions of the
#: Zenodo release copy them; the converter reads them from the release itself, the replicas write these.
RELEASE_LABELS = ("background", "spleen", "right kidney", "left kidney", "gall bladder", "esophagus", "liver",
                  "stomach", "arota", "postcava", "pancreas", "right adrenal gland", "left adrenal gland", "duodenum",
                  "bladder", "prostate/uterus")

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


def release_json(src: Path, task: int | str) -> tuple[Path, str]:
    """The json describing the release (and its form, "zenodo" or "first-stage"), or a refusal naming the file."""
    if (src / RELEASE_JSON).is_file():
        return src / RELEASE_JSON, "zenodo"
    first_stage = [src / name for name in sorted(set(FIRST_STAGE_JSONS.values())) if (src / name).is_file()]
    if not first_stage:
        raise UserFacingError(
            f"{src} does not look like the AMOS22 release: neither {src / RELEASE_JSON} (the Zenodo release) nor "
            f"{src / FIRST_STAGE_JSONS[1]} / {src / FIRST_STAGE_JSONS[2]} (the first-stage release) exists. Pass the "
            f"unpacked amos22/ folder that holds one of them and imagesTr/.")
    wanted = src / FIRST_STAGE_JSONS[task]
    if not wanted.is_file():
        raise UserFacingError(
            f"{wanted} is missing: the first-stage release describes --task {task} there (found only "
            f"{', '.join(p.name for p in first_stage)}). Restore it from the release, or convert another task.")
    return wanted, "first-stage"


def plan(src: str | Path, task: int | str = 2, include_validation: bool = False) -> ConversionPlan:
    """List the cases of the release selected by ``task`` (1: CT, 2: CT+MRI, "mri": MRI)."""
    task = parse_task(task)
    src = Path(src).resolve()
    json_path, form = release_json(src, task)
    if not (src / "imagesTr").is_dir():
        raise UserFacingError(f"{src / 'imagesTr'} is missing: the AMOS22 release keeps its training images there "
                              f"(beside {json_path.name}). Pass the unpacked amos22/ folder.")
    try:
        release = json.loads(json_path.read_text())
    except (OSError, ValueError) as error:
        raise UserFacingError(f"{json_path} cannot be read as JSON ({error}). Restore the release's {json_path.name}."
                              ) from None
    if not isinstance(release, dict) or "training" not in release:
        raise UserFacingError(f"{json_path} has no 'training' list; is this the AMOS22 release's {json_path.name}?")
    labels = _labels(release, json_path)
    validation = "validation" if form == "zenodo" else "test"  # first stage: imagesTs = the validation images
    labelled_validation = form == "zenodo"
    if include_validation:
        if not labelled_validation:
            raise UserFacingError(f"--include-validation needs labelled validation cases; the first-stage release "
                                  f"({json_path.name}) has none. Download the Zenodo release (imagesVa, labelsVa), "
                                  f"or leave out --include-validation.")
        if _entries(release, validation, json_path) and not (src / "labelsVa").is_dir():
            raise UserFacingError(f"--include-validation needs the validation labels in {src / 'labelsVa'}, which "
                                  f"this release does not contain. Download the release with labelsVa, or leave "
                                  f"out --include-validation.")
    selections = [("training", "Tr", True), (validation, "Tr" if include_validation else "Va", labelled_validation)]
    if form == "zenodo":
        selections.append(("test", "Ts", False))
    cases: list[CaseSource] = []
    problems: list[tuple[str, str]] = []
    for key, split, labelled in selections:
        for index, entry in enumerate(_entries(release, key, json_path)):
            case, problem = _case(src, json_path, key, index, entry, split, labelled)
            case_id = case.case_id if case is not None else problem[0] if problem else ""
            if CASE_PATTERN.match(case_id) and not _in_task(task, case_id):
                continue
            if case is not None and case_id in {c.case_id for c in cases}:
                case, problem = None, (case_id, f"{json_path}: {case_id} is listed twice; remove one of its entries")
            if problem:
                problems.append(problem)
            elif case is not None:
                cases.append(case)
    dataset_json = {
        "name": default_name(task),
        "description": f"AMOS22 {_DESCRIPTIONS[task]} converted by nnunet-ext from the {form} release"
                       + (", validation cases in training" if include_validation else
                          "; validation cases in imagesVa, test cases in imagesTs"),
        "reference": "https://amos22.grand-challenge.org/",
        "licence": "CC BY 4.0",
        "channel_names": {"0": _CHANNELS[task]},
        "labels": labels,
    }
    identity = {"challenge": CHALLENGE, "task": task, "include_validation": include_validation,
                "layout": LAYOUT_VERSION}
    return ConversionPlan(CHALLENGE, identity, dataset_json, frozenset(labels.values()), cases, problems, str(src))


# --------------------------------------------------------------------------------------
# What the registry reads (nnunet_ext.challenges.registry)
# --------------------------------------------------------------------------------------


def conversion(src: str | Path, options: dict) -> tuple[ConversionPlan, str]:
    """``nnunet-ext convert amos22 [--task 1|2|mri] [--include-validation]``: the plan and the default name."""
    task = parse_task(options.get("task") or 2)
    return plan(src, task, bool(options.get("include_validation"))), default_name(task)


def labels(task: str | None = None) -> dict:
    """The organ labels of the release (the converter takes them from the release's json)."""
    return {name: value for value, name in enumerate(RELEASE_LABELS)}


def _selects(task: str):
    return None if str(task) == "2" else (lambda case: is_ct(case))


def submission_format(task: str, phase: str = "validation") -> SubmissionFormat:
    """One zip with ``results/amos_XXXX.nii.gz`` (uint8 0-15), one file per image of the task and phase."""
    values = frozenset(range(NUM_LABELS))
    return SubmissionFormat(CHALLENGE, f"AMOS22 task {task} {phase}", phase, CASE_PATTERN, FILE_ENDING, values,
                            values, "{case}" + FILE_ENDING, "amos_0008", archive_folder="results",
                            selects=_selects(task),
                            official_count=VALIDATION_CASES[str(task)] if phase == "validation" else None,
                            source=EVALUATION_PAGE)


def container_interface(task: str) -> ContainerInterface:
    """Assumed (see the how-to page): every ``/input/<name>.nii.gz`` -> ``/output/<name>.nii.gz``, uint8 0-15.

    The evaluation page asks for "a docker container" and gives no paths; this is the flat ``.nii.gz``
    layout the issue names for AMOS and KiTS21's first instructions used. ``challenge-infer --input
    DIR --output DIR`` can point elsewhere.
    """
    values = frozenset(range(NUM_LABELS))
    output = SubmissionFormat(CHALLENGE, f"AMOS22 task {task} container", "test", re.compile(r"^.+$"), FILE_ENDING,
                              values, values, "{case}" + FILE_ENDING, "<name>", source=EVALUATION_PAGE)
    return ContainerInterface((InputSlot("", FILE_ENDING, "CT or MRI"),), "", output, EVALUATION_PAGE, assumed=True)
