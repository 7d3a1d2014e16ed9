"""The one table of challenges: each maps to its converter, label map, submission formats and container interface.

``nnunet-ext convert``, ``submit``, ``container`` and ``challenge-infer`` (and their tests) read this
table: adding a challenge is one module (its release layout, labels, submission format and container
interface, see ``kits21.py`` for the smallest) plus one :class:`Challenge` line here. Entries name
functions by import path, as strings, so building the command-line parser imports nothing; the
challenge's module is imported when a command runs. The validator is shared
(:func:`nnunet_ext.challenges.submission.validate_submission`): it checks a submission against the
challenge's :class:`~nnunet_ext.challenges.definition.SubmissionFormat`.
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any

from nnunet_ext.errors import UserFacingError


@dataclass(frozen=True)
class Option:
    """A challenge-specific option of ``nnunet-ext convert`` (argparse keywords as data)."""

    flag: str
    help: str
    choices: tuple[str, ...] | None = None
    default: str | None = None
    required: bool = False
    switch: bool = False  # store_true


@dataclass(frozen=True)
class Challenge:
    """One challenge. The four callables are ``"module:function"`` strings:

    - ``converter(src, options) -> (ConversionPlan, default dataset name)``, options from ``convert_options``;
    - ``labels(task) -> dict``: the converted dataset's ``labels`` (dataset.json);
    - ``submission(task, phase) -> SubmissionFormat``: what the leaderboard takes (checked by the validator);
    - ``container(task) -> ContainerInterface``: the algorithm container's input and output files.
    """

    name: str
    title: str
    release: str  # what SRC is, one line (convert's help)
    converter: str
    labels: str
    submission: str
    container: str
    tasks: tuple[str, ...] = ()  # --task of submit/container/challenge-infer (required when there are tasks)
    phases: tuple[str, ...] = ("local",)  # --phase of submit; the first is the default
    convert_options: tuple[Option, ...] = ()
    convert_description: str = ""


CHALLENGES: tuple[Challenge, ...] = (
    Challenge(
        name="kits21", title="KiTS21",
        release="SRC = kits21/data (case_XXXXX/imaging.nii.gz, aggregated_MAJ_seg.nii.gz)",
        converter="nnunet_ext.challenges.kits21:conversion", labels="nnunet_ext.challenges.kits21:labels",
        submission="nnunet_ext.challenges.kits21:submission_format",
        container="nnunet_ext.challenges.kits21:container_interface",
        convert_description="SRC is the KiTS21 release's data/ folder of case_XXXXX/ folders with imaging.nii.gz and "
                            "aggregated_MAJ_seg.nii.gz. Writes a region-based dataset (kidney+masses, masses, tumor; "
                            "regions_class_order 1,3,2). Cases without a segmentation go to imagesTs. Default name "
                            "KiTS21."),
    Challenge(
        name="amos22", title="AMOS22",
        release="SRC = amos22/ (dataset.json with imagesTr, labelsTr, imagesVa, labelsVa, imagesTs; or the "
                "first-stage task1_dataset.json, task2_dataset.json)",
        converter="nnunet_ext.challenges.amos22:conversion", labels="nnunet_ext.challenges.amos22:labels",
        submission="nnunet_ext.challenges.amos22:submission_format",
        container="nnunet_ext.challenges.amos22:container_interface",
        tasks=("1", "2"), phases=("validation", "test"),
        convert_options=(
            Option("--task", "1: CT only; 2: CT and MRI (default); mri: MRI only (merge with task 1 for a CT + MRI "
                             "universal dataset)", choices=("1", "2", "mri"), default="2"),
            Option("--include-validation", "train on the labelled validation cases too (needs labelsVa)", switch=True),
        ),
        convert_description="SRC is the unpacked AMOS22 release: dataset.json (Zenodo release: imagesTr, labelsTr, "
                            "imagesVa, labelsVa, imagesTs) or the first-stage task1_dataset.json / task2_dataset.json "
                            "(imagesTr, labelsTr, imagesTs). Task 1: CT cases (ids <= 500); task 2: CT and MRI. Labels "
                            "from the release's json. Validation cases go to imagesVa (with labelsVa where the release "
                            "has them; the first-stage imagesTs are the validation images), test cases to imagesTs. "
                            "Default name AMOS22Task1 / AMOS22Task2."),
    Challenge(
        name="segrap2023", title="SegRap2023",
        release="SRC holds SegRap2023_Training_Set_120cases and its _OneHot_Labels",
        converter="nnunet_ext.challenges.segrap2023:conversion", labels="nnunet_ext.challenges.segrap2023:labels",
        submission="nnunet_ext.challenges.segrap2023:submission_format",
        container="nnunet_ext.challenges.segrap2023:container_interface",
        tasks=("oar", "gtv"),
        convert_options=(Option("--task", "oar (task 1) or gtv (task 2)", choices=("oar", "gtv"), required=True),),
        convert_description="SRC holds SegRap2023_Training_Set_120cases/segrap_XXXX/{image,image_contrast}.nii.gz "
                            "and SegRap2023_Training_Set_120cases_OneHot_Labels/Task001|Task002/. Channels: 0 "
                            "non-contrast CT, 1 contrast CT. --task oar: the 45 OARs as the release's 54 disjoint "
                            "classes; --task gtv: GTVp, GTVnd. One dataset per task. Default name SegRap2023OAR / "
                            "SegRap2023GTV."),
)


def names() -> tuple[str, ...]:
    return tuple(entry.name for entry in CHALLENGES)


def get(name: str) -> Challenge:
    for entry in CHALLENGES:
        if entry.name == name:
            return entry
    close = difflib.get_close_matches(str(name), names(), n=1)
    raise UserFacingError(f"unknown challenge {name!r}; choose one of {', '.join(names())}"
                          + (f" (did you mean {close[0]}?)." if close else "."))


def load(spec: str) -> Any:
    """The object a ``"module:attribute"`` string names."""
    module, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module), attribute)


def check_task(entry: Challenge, task: str | None) -> str | None:
    """``task`` if the challenge has it (None for a challenge without tasks), else a one-line refusal."""
    if not entry.tasks:
        if task is not None:
            raise UserFacingError(f"{entry.title} has no tasks; leave out --task.")
        return None
    if task not in entry.tasks:
        raise UserFacingError(f"{entry.title} needs --task {{{','.join(entry.tasks)}}} (got {task!r}).")
    return task


def submission_format(name: str, task: str | None = None, phase: str | None = None):
    """The :class:`SubmissionFormat` of a challenge's task and phase (default: its first phase)."""
    entry = get(name)
    phase = entry.phases[0] if phase is None else phase
    if phase not in entry.phases:
        raise UserFacingError(f"{entry.title} has no phase {phase!r}; choose one of {', '.join(entry.phases)}.")
    return load(entry.submission)(check_task(entry, task), phase)


def container_interface(name: str, task: str | None = None):
    """The :class:`ContainerInterface` of a challenge's task."""
    entry = get(name)
    return load(entry.container)(check_task(entry, task))
