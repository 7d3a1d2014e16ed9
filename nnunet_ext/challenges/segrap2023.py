"""SegRap2023 (nasopharyngeal carcinoma radiotherapy planning, MICCAI 2023) -> nnU-Net v2 raw datasets.

What was found (public sources, read 2025):
- The organisers' repository HiLab-git/SegRap2023 (tutorial, evaluation and Docker example) and
  third-party conversion scripts agree on the release layout::

      SegRap2023_Training_Set_120cases/
          segrap_0000/image.nii.gz             non-contrast CT
          segrap_0000/image_contrast.nii.gz    contrast-enhanced CT (pre-aligned to the first)
          segrap_0000/<Structure>.nii.gz       one binary mask per structure (e.g. Brain.nii.gz, GTVp.nii.gz)
      SegRap2023_Training_Set_120cases_OneHot_Labels/
          Task001/segrap_0000.nii.gz           OARs as one label map of 54 disjoint classes
          Task002/segrap_0000.nii.gz           GTVs: 1 GTVp, 2 GTVnd

- The 45 OARs overlap (Brain contains BrainStem, TemporalLobe, Hippocampus, ...; MiddleEar contains
  Cochlea, IAC, ...; Larynx contains Larynx_Glottic, ...). The organisers therefore ship Task001 as
  54 disjoint classes and give, in their Docker example's post_processing.py and in
  convert_one_hot_prediction_to_multi_organs_lesions.py, the union of classes forming each OAR
  (:data:`OAR_COMPOSITION`). Their nnU-Net baseline trains on those 54 classes; we do the same, and
  ``nnunet-ext submit segrap2023`` rebuilds the 45 OAR masks from a prediction with that table.
- The 45 OAR names and their channel order are those of the organisers' evaluation script and
  Docker example (``stacked_results_to_4d_mha.py``).

What is assumed:
- The names of the 54 disjoint classes (the release has a one_hot_label_names.txt we could not
  read): they are derived from the composition table (a class inside exactly one OAR takes that
  OAR's name; a class shared by two takes both names, outer first, e.g.
  ``TemporalLobe_Hippocampus_L``). Only the values matter to nnU-Net and to the submission.
- That SRC is the folder holding ``SegRap2023_Training_Set_120cases`` and its ``_OneHot_Labels``
  sibling (SRC may also be the image folder itself; the labels folder is then its
  ``<name>_OneHot_Labels`` sibling). Case folders with no label map go to imagesTs.
- Building the 54-class maps from the per-structure masks is left out: the release ships them.

Both CTs are in Hounsfield units, so both channels are named "CT" (nnU-Net's CT normalisation, with
intensity statistics per channel); channel 0 is the non-contrast CT, channel 1 the contrast CT.
"""
from __future__ import annotations

import re
from pathlib import Path

from nnunet_ext.challenges.common import CaseSource, ConversionPlan
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
#: GTV task: label values of the Task002 maps, also the submission channel order.
GTV_LABELS = {"GTVp": 1, "GTVnd": 2}


def oar_class_names() -> dict[int, str]:
    """Names of the 54 disjoint classes, derived from :data:`OAR_COMPOSITION` (assumed; see module doc).

    A class's name joins the OARs containing it from the largest to the smallest, dropping "Brain"
    and "MiddleEar"-style containers only when a smaller OAR names it alone; e.g. class 6 lies in
    Brain, TemporalLobe_L and Hippocampus_L -> ``TemporalLobe_Hippocampus_L``.
    """
    names = {}
    for value in range(1, NUM_OAR_CLASSES + 1):
        owners = sorted((oar for oar, parts in OAR_COMPOSITION.items() if value in parts),
                        key=lambda oar: -len(OAR_COMPOSITION[oar]))
        if len(owners) > 1 and owners[0] == "Brain":
            owners = owners[1:]  # everything in the brain is in Brain; say where inside it
        if len(owners) == 1 or len(OAR_COMPOSITION[owners[-1]]) == 1:
            names[value] = owners[-1]  # the smallest OAR owns this class alone
        else:
            stems = [o.rsplit("_", 1)[0] if o[-2:] in ("_L", "_R") else o for o in owners]
            side = owners[-1][-2:] if owners[-1][-2:] in ("_L", "_R") else ""
            names[value] = "_".join(stems) + side
    return names


def task_labels(task: str) -> dict[str, int]:
    if task == "oar":
        return {"background": 0, **{name: value for value, name in oar_class_names().items()}}
    return {"background": 0, **GTV_LABELS}


def default_name(task: str) -> str:
    return f"SegRap2023{task.upper()}"


def _folders(src: Path, task: str) -> tuple[Path, Path]:
    images = src / IMAGE_FOLDER if (src / IMAGE_FOLDER).is_dir() else src
    if not any(p.is_dir() and CASE_PATTERN.match(p.name) for p in images.iterdir()):
        raise UserFacingError(
            f"{src} does not look like the SegRap2023 release: expected {IMAGE_FOLDER}/segrap_XXXX/ folders with "
            f"{' and '.join(CHANNEL_FILES)} (and the {IMAGE_FOLDER}{LABELS_SUFFIX}/ folder beside it). Pass the "
            f"folder that holds both.")
    labels = images.with_name(images.name + LABELS_SUFFIX) / TASK_FOLDERS[task]
    if not labels.is_dir():
        raise UserFacingError(
            f"{labels} not found: the {task.upper()} task's label maps are in the release's "
            f"{images.name}{LABELS_SUFFIX}/{TASK_FOLDERS[task]}/ folder (segrap_XXXX.nii.gz). Unpack it next to "
            f"{images}.")
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
        "description": ("SegRap2023 task 1: 45 OARs as the organisers' 54 disjoint classes (OAR = union of classes, "
                        "see nnunet_ext.challenges.segrap2023.OAR_COMPOSITION)" if task == "oar" else
                        "SegRap2023 task 2: GTVp and GTVnd") + "; channel 0 non-contrast CT, 1 contrast CT.",
        "reference": "https://segrap2023.grand-challenge.org/",
        "licence": "see the challenge's data terms",
        "channel_names": {"0": "CT", "1": "CT"},
        "labels": labels,
    }
    identity = {"challenge": CHALLENGE, "task": task}
    return ConversionPlan(CHALLENGE, identity, dataset_json, frozenset(labels.values()), cases, problems, str(src))
