"""SegRap2023 (nasopharyngeal carcinoma radiotherapy planning, MICCAI 2023) -> nnU-Net v2 raw datasets.

Facts and their sources (also in docs/how-to/challenges/segrap2023.md):

- Release layout: ``SegRap2023_Training_Set_120cases/segrap_XXXX/image.nii.gz`` (non-contrast CT)
  and ``image_contrast.nii.gz`` (contrast CT), and ``SegRap2023_Training_Set_120cases_OneHot_Labels/
  Task001|Task002/segrap_XXXX.nii.gz`` (one label map per case): the file names of the release's
  archives and their use in the organisers' tutorial (HiLab-git/SegRap2023, ``Tutorial/``) and in
  MIC-DKFZ/radioactive ``src/intrab/datasets_preprocessing/d651_segrap.py``, which also shows the
  image archive unpacking into a second ``SegRap2023_Training_Set_120cases/`` folder (accepted here).
- Task001 holds the 45 OARs as 54 disjoint classes; their names (:data:`OAR_CLASS_NAMES`) are the
  release's, letter for letter, with the ``OverLap`` marker for classes shared by two OARs (e.g.
  ``TemporalLobe_Hippocampus_OverLap_L``, ``Larynx_PharynxConst_OverLap``), as MIC-DKFZ/radioactive
  ``d651_segrap.py`` (``SEGRAP_TASK001_ONE_HOT_LABEL_NAMES``) and a second, independent conversion
  script list them. The release's own ``one_hot_label_names.txt`` could not be read here; the two
  agree with each other and with the composition below.
- Each OAR is the union of classes in :data:`OAR_COMPOSITION`, in the submission's channel order
  (organisers' ``Docker_tutorial/SegRap2023_task1_OARs_nnUNet_Example/post_processing.py`` and
  ``Docker_tutorial/stacked_results_to_4d_mha.py``). Task002: 1 GTVp, 2 GTVnd.
- Submission: an algorithm container on grand-challenge.org reads ``/input/images/head-neck-ct/
  <uuid>.mha`` and ``/input/images/head-neck-contrast-enhanced-ct/<uuid>.mha`` and writes one 4D
  ``.mha`` of shape [45, *image shape] (task 1) to ``/output/images/head-neck-segmentation/`` or
  [2, *image shape] (task 2) to ``/output/images/gross-tumor-volume-segmentation/``, named by the
  non-contrast CT's uuid (organisers' README section 1.1 and the examples' ``process.py``).

The 54 classes are what nnU-Net trains on (as the organisers' nnU-Net baseline does); ``nnunet-ext
submit`` / ``challenge-infer`` rebuild the 45 OAR masks with :data:`OAR_COMPOSITION`. Case folders
with no label map go to imagesTs. Both CTs are in Hounsfield units, so both channels are named "CT"
(nnU-Net's CT normalisation, with intensity statistics per channel); channel 0 is the non-contrast
CT, channel 1 the contrast CT.
"""
from __future__ import annotations

import re
from pathlib import Path

from nnunet_ext.challenges.common import CaseSource, ConversionPlan
from nnunet_ext.challenges.definition import ContainerInterface, InputSlot, SubmissionFormat
from nnunet_ext.errors import UserFacingError

CHALLENGE = "segrap2023"
CASE_PATTERN = re.compile(r"^segrap_\d{4}$")
IMAGE_FOLDER = "SegRap2023_Training_Set_120cases"
LABELS_SUFFIX = "_OneHot_Labels"
CHANNEL_FILES = ("image.nii.gz", "image_contrast.nii.gz")
TASK_FOLDERS = {"oar": "Task001", "gtv": "Task002"}
TASKS = tuple(TASK_FOLDERS)

#: The 45 OARs in the challenge's submission channel order, each as the union of disjoint Task001 classes.
OAR_COMPOSITION: dict[str, tuple[int, ...]] = {
    "Brain": (1, 2, 3, 4, 5, 6, 7, 8, 9),
    "BrainStem": (2,),
    "Chiasm": (3,),
    "TemporalLobe_L": (4, 6),
    "TemporalLobe_R": (5, 7),
    "Hippocampus_L": (6, 8),
    "Hippocampus_R": (7, 9),
    "Eye_L": (10, 12),
    "Eye_R": (11, 13),
    "Lens_L": (12,),
    "Lens_R": (13,),
    "OpticNerve_L": (14,),
    "OpticNerve_R": (15,),
    "MiddleEar_L": (16, 18, 20, 24, 28, 30),
    "MiddleEar_R": (17, 19, 21, 25, 29, 31),
    "IAC_L": (18,),
    "IAC_R": (19,),
    "TympanicCavity_L": (20, 22),
    "TympanicCavity_R": (21, 23),
    "VestibulSemi_L": (24, 26),
    "VestibulSemi_R": (25, 27),
    "Cochlea_L": (28,),
    "Cochlea_R": (29,),
    "ETbone_L": (30, 32),
    "ETbone_R": (31, 33),
    "Pituitary": (34,),
    "OralCavity": (35,),
    "Mandible_L": (36,),
    "Mandible_R": (37,),
    "Submandibular_L": (38,),
    "Submandibular_R": (39,),
    "Parotid_L": (40,),
    "Parotid_R": (41,),
    "Mastoid_L": (42,),
    "Mastoid_R": (43,),
    "TMjoint_L": (44,),
    "TMjoint_R": (45,),
    "SpinalCord": (46,),
    "Esophagus": (47,),
    "Larynx": (48, 49, 50, 51),
    "Larynx_Glottic": (49,),
    "Larynx_Supraglot": (50,),
    "PharynxConst": (51, 52),
    "Thyroid": (53,),
    "Trachea": (54,),
}
NUM_OAR_CLASSES = 54
#: The release's names of the 54 Task001 classes (value -> name), letter for letter; see the module doc.
OAR_CLASS_NAMES: dict[int, str] = dict(enumerate((
    "Brain", "BrainStem", "Chiasm", "TemporalLobe_L", "TemporalLobe_R",
    "TemporalLobe_Hippocampus_OverLap_L", "TemporalLobe_Hippocampus_OverLap_R", "Hippocampus_L", "Hippocampus_R",
    "Eye_L", "Eye_R", "Lens_L", "Lens_R", "OpticNerve_L", "OpticNerve_R", "MiddleEar_L", "MiddleEar_R",
    "IAC_L", "IAC_R", "MiddleEar_TympanicCavity_OverLap_L", "MiddleEar_TympanicCavity_OverLap_R",
    "TympanicCavity_L", "TympanicCavity_R", "MiddleEar_VestibulSemi_OverLap_L", "MiddleEar_VestibulSemi_OverLap_R",
    "VestibulSemi_L", "VestibulSemi_R", "Cochlea_L", "Cochlea_R", "MiddleEar_ETbone_OverLap_L",
    "MiddleEar_ETbone_OverLap_R", "ETbone_L", "ETbone_R", "Pituitary", "OralCavity", "Mandible_L", "Mandible_R",
    "Submandibular_L", "Submandibular_R", "Parotid_L", "Parotid_R", "Mastoid_L", "Mastoid_R", "TMjoint_L",
    "TMjoint_R", "SpinalCord", "Esophagus", "Larynx", "Larynx_Glottic", "Larynx_Supraglot",
    "Larynx_PharynxConst_OverLap", "PharynxConst", "Thyroid", "Trachea"), start=1))
#: GTV task: label values of the Task002 maps, also the submission channel order.
GTV_LABELS = {"GTVp": 1, "GTVnd": 2}


def oar_class_names() -> dict[int, str]:
    """Names of the 54 disjoint Task001 classes, as the release names them (:data:`OAR_CLASS_NAMES`)."""
    return dict(OAR_CLASS_NAMES)


def task_labels(task: str) -> dict[str, int]:
    if task == "oar":
        return {"background": 0, **{name: value for value, name in oar_class_names().items()}}
    return {"background": 0, **GTV_LABELS}


def default_name(task: str) -> str:
    return f"SegRap2023{task.upper()}"


def _has_cases(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_dir() and CASE_PATTERN.match(p.name) for p in folder.iterdir())


def _folders(src: Path, task: str) -> tuple[Path, Path]:
    """The case folders and the task's label folder; the archives may unpack into a second folder of the same
    name (``SegRap2023_Training_Set_120cases/SegRap2023_Training_Set_120cases/segrap_XXXX``)."""
    candidates = [src / IMAGE_FOLDER / IMAGE_FOLDER, src / IMAGE_FOLDER, src]
    images = next((folder for folder in candidates if _has_cases(folder)), None)
    if images is None:
        raise UserFacingError(
            f"{src} does not look like the SegRap2023 release: expected {IMAGE_FOLDER}/segrap_XXXX/ folders with "
            f"{' and '.join(CHANNEL_FILES)} (and the {IMAGE_FOLDER}{LABELS_SUFFIX}/ folder beside it). Pass the "
            f"folder that holds both.")
    labels_name = IMAGE_FOLDER + LABELS_SUFFIX if images.name == IMAGE_FOLDER else images.name + LABELS_SUFFIX
    bases = [images.parent] + ([images.parent.parent] if images.parent.name == images.name else [])
    tried = [base / labels_name / sub / TASK_FOLDERS[task] for base in bases for sub in ("", labels_name)]
    labels = next((folder for folder in tried if folder.is_dir()), None)
    if labels is None:
        raise UserFacingError(
            f"{tried[0]} not found: the {task.upper()} task's label maps are in the release's "
            f"{labels_name}/{TASK_FOLDERS[task]}/ folder (segrap_XXXX.nii.gz). Unpack it next to {images}.")
    return images, labels


def plan(src: str | Path, task: str = "oar") -> ConversionPlan:
    """List the cases of the release for one task ("oar": 45 OARs as 54 classes; "gtv": GTVp, GTVnd)."""
    if task not in TASKS:
        raise UserFacingError(f"--task must be one of {', '.join(TASKS)}, got {task!r}.")
    src = Path(src).resolve()
    if not src.is_dir():
        raise UserFacingError(f"{src} is not a folder. Pass the SegRap2023 release folder holding {IMAGE_FOLDER}/.")
    images_folder, labels_folder = _folders(src, task)
    cases, problems = [], []
    for folder in sorted(p for p in images_folder.iterdir() if p.is_dir() and CASE_PATTERN.match(p.name)):
        channels = [folder / f for f in CHANNEL_FILES]
        missing = [str(p) for p in channels if not p.is_file()]
        if missing:
            problems.append((folder.name, "missing " + ", ".join(missing)))
            continue
        label = labels_folder / f"{folder.name}.nii.gz"
        has_label = label.is_file()
        if not has_label and (label.exists() or label.is_symlink()):
            problems.append((folder.name, f"{label} is not a readable file; restore it from the release"))
            continue
        cases.append(CaseSource(folder.name, tuple(map(str, channels)), str(label) if has_label else None,
                                "Tr" if has_label else "Ts"))
    labels = task_labels(task)
    dataset_json = {
        "name": default_name(task),
        "description": ("SegRap2023 task 1: 45 OARs as the release's 54 disjoint classes (OAR = union of classes, "
                        "see nnunet_ext.challenges.segrap2023.OAR_COMPOSITION)" if task == "oar" else
                        "SegRap2023 task 2: GTVp and GTVnd") + "; channel 0 non-contrast CT, 1 contrast CT.",
        "reference": "https://segrap2023.grand-challenge.org/",
        "licence": "see the challenge's data terms",
        "channel_names": {"0": "CT", "1": "CT"},
        "labels": labels,
    }
    identity = {"challenge": CHALLENGE, "task": task}
    return ConversionPlan(CHALLENGE, identity, dataset_json, frozenset(labels.values()), cases, problems, str(src))


# --------------------------------------------------------------------------------------
# What the registry reads (nnunet_ext.challenges.registry)
# --------------------------------------------------------------------------------------

REPOSITORY = "https://github.com/HiLab-git/SegRap2023"
#: output folder of the algorithm container per task (organisers' README, section 1.1)
OUTPUT_FOLDERS = {"oar": "images/head-neck-segmentation", "gtv": "images/gross-tumor-volume-segmentation"}


def conversion(src: str | Path, options: dict) -> tuple[ConversionPlan, str]:
    """``nnunet-ext convert segrap2023 --task oar|gtv``: the plan and the default dataset name."""
    task = str(options.get("task"))
    return plan(src, task), default_name(task)


def labels(task: str | None) -> dict:
    return task_labels(str(task))


def stack_channels(task: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The 4D output's channels in the organisers' order, each with the predicted values it unites."""
    if task == "oar":
        return tuple(OAR_COMPOSITION.items())
    return tuple((name, (value,)) for name, value in GTV_LABELS.items())


def _format(task: str, title: str, phase: str, case_pattern: re.Pattern, example: str, source: str) -> SubmissionFormat:
    return SubmissionFormat(CHALLENGE, title, phase, case_pattern, ".mha", frozenset(task_labels(task).values()),
                            frozenset({0, 1}), "{case}/" + CHANNEL_FILES[0], example, stack_channels(task),
                            source=source)


def submission_format(task: str, phase: str = "local") -> SubmissionFormat:
    """``local``: segrap_XXXX.mha per case, the 4D uint8 stack the container writes (45 OARs or GTVp, GTVnd)."""
    return _format(task, f"SegRap2023 {task.upper()}", phase, CASE_PATTERN, "segrap_0001", REPOSITORY)


def container_interface(task: str) -> ContainerInterface:
    """Two CTs in (non-contrast first), one 4D stack out, named like the non-contrast CT's uuid."""
    output = _format(task, f"SegRap2023 {task.upper()} container", "test", re.compile(r"^.+$"), "<uuid>",
                     REPOSITORY + "#11-important-input-and-output")
    return ContainerInterface((InputSlot("images/head-neck-ct", ".mha", "non-contrast CT"),
                               InputSlot("images/head-neck-contrast-enhanced-ct", ".mha", "contrast-enhanced CT")),
                              OUTPUT_FOLDERS[task], output, output.source)
