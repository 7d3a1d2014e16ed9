"""KiTS21 (kidney tumour segmentation challenge 2021) -> nnU-Net v2 raw dataset.

Release layout (github.com/neheller/kits21 after its download script): ``kits21/data/`` holds one
folder per case, ``case_XXXXX/``, with ``imaging.nii.gz`` (CT) and ``aggregated_MAJ_seg.nii.gz``
(majority vote of the annotators; 0 background, 1 kidney, 2 tumour, 3 cyst). SRC is that ``data/``
folder. A case folder without the segmentation (a test case) goes to imagesTs.

The challenge ranks on hierarchical regions (kidney+masses, masses = tumour+cyst, tumour), and the
winning nnU-Net entries trained on those regions with sigmoid outputs. nnU-Net's region-based
training reads that from dataset.json: each label name maps to the label values forming its region,
and ``regions_class_order`` says which value each region is painted with at export (in region order,
later regions overwrite earlier ones): kidney -> 1, masses -> 3, tumour -> 2. So predictions come
back in KiTS label values (1 kidney, 2 tumour, 3 cyst), and the label files are copied unchanged.

Submission (sources in docs/how-to/challenges/kits21.md): the test set was only run as an algorithm
container on grand-challenge.org, reading ``/input/images/ct/<uuid>.mha`` and writing
``/output/images/kidney-tumor-and-cyst/<uuid>.mha`` (neheller/kits21,
``examples/submission/sanity_check_guide.md`` and ``dummy_submission/run_inference.py``). The
``local`` format is what the organisers' evaluation script reads: a folder of ``case_XXXXX.nii.gz``
(``kits21/evaluation/evaluate_predictions.py``).
"""
from __future__ import annotations

import re
from pathlib import Path

from nnunet_ext.challenges.common import FILE_ENDING, CaseSource, ConversionPlan
from nnunet_ext.challenges.definition import ContainerInterface, InputSlot, SubmissionFormat
from nnunet_ext.errors import UserFacingError

CHALLENGE = "kits21"
DEFAULT_NAME = "KiTS21"
CASE_PATTERN = re.compile(r"^case_\d{5}$")
IMAGE_FILE = "imaging.nii.gz"
LABEL_FILE = "aggregated_MAJ_seg.nii.gz"
#: Label values in the release's segmentation files.
SOURCE_LABELS = {0: "background", 1: "kidney", 2: "tumor", 3: "cyst"}
#: nnU-Net region-based labels (dataset.json "labels") and the value each region is exported as.
REGION_LABELS = {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2}
REGIONS_CLASS_ORDER = [1, 3, 2]
#: neheller/kits21, examples/submission/sanity_check_guide.md ("the UPDATED I/O format")
CONTAINER_SOURCE = "https://github.com/neheller/kits21/blob/master/examples/submission/sanity_check_guide.md"
LOCAL_SOURCE = "https://github.com/neheller/kits21/blob/master/kits21/evaluation/evaluate_predictions.py"


def dataset_json() -> dict:
    return {
        "name": DEFAULT_NAME,
        "description": "KiTS21 converted by nnunet-ext: region-based (kidney+masses, masses, tumor) as the "
                       "winning nnU-Net entries were trained; source labels 1 kidney, 2 tumor, 3 cyst.",
        "reference": "https://kits-challenge.org/kits21/",
        "licence": "CC BY-NC-SA 4.0",
        "channel_names": {"0": "CT"},
        "labels": dict(REGION_LABELS),
        "regions_class_order": list(REGIONS_CLASS_ORDER),
    }


def _looks_like_release_hint(src: Path) -> str:
    for candidate in (src / "data", src / "kits21" / "data"):
        if candidate.is_dir() and any(CASE_PATTERN.match(p.name) for p in candidate.iterdir()):
            return f" Did you mean {candidate}?"
    return ""


def plan(src: str | Path) -> ConversionPlan:
    """List the cases of the release's ``data/`` folder (headers and voxels are read later, per case)."""
    src = Path(src).resolve()
    if not src.is_dir():
        raise UserFacingError(f"{src} is not a folder. Pass the KiTS21 release's data/ folder "
                              f"(kits21/data with case_XXXXX/{IMAGE_FILE}).")
    folders = sorted(p for p in src.iterdir() if p.is_dir() and CASE_PATTERN.match(p.name))
    if not folders:
        raise UserFacingError(
            f"{src} does not look like the KiTS21 release's data/ folder: no case_XXXXX/ folders in it "
            f"(each with {IMAGE_FILE} and {LABEL_FILE}).{_looks_like_release_hint(src)}")
    cases, problems = [], []
    for folder in folders:
        image, label = folder / IMAGE_FILE, folder / LABEL_FILE
        if not image.is_file():
            problems.append((folder.name, f"missing {image}"))
            continue
        has_label = label.is_file()
        if not has_label and (label.exists() or label.is_symlink()):
            problems.append((folder.name, f"{label} is not a readable file; restore it from the release"))
            continue
        cases.append(CaseSource(folder.name, (str(image),), str(label) if has_label else None,
                                "Tr" if has_label else "Ts"))
    return ConversionPlan(CHALLENGE, {"challenge": CHALLENGE}, dataset_json(),
                          frozenset(SOURCE_LABELS), cases, problems, str(src))


# --------------------------------------------------------------------------------------
# What the registry reads (nnunet_ext.challenges.registry)
# --------------------------------------------------------------------------------------


def conversion(src: str | Path, options: dict) -> tuple[ConversionPlan, str]:
    """``nnunet-ext convert kits21``: the plan and the default dataset name (KiTS21 has no options)."""
    return plan(src), DEFAULT_NAME


def labels(task: str | None = None) -> dict:
    return dict(REGION_LABELS)


def submission_format(task: str | None = None, phase: str = "local") -> SubmissionFormat:
    """``local``: case_XXXXX.nii.gz, uint8 0-3, the folder the organisers' evaluation script reads."""
    values = frozenset(SOURCE_LABELS)
    return SubmissionFormat("kits21", "KiTS21", phase, CASE_PATTERN, FILE_ENDING, values, values,
                            "{case}/" + IMAGE_FILE, "case_00300", source=LOCAL_SOURCE)


def container_interface(task: str | None = None) -> ContainerInterface:
    """One CT in, its label map (uint8: 1 kidney, 2 tumour, 3 cyst) out, both ``.mha`` named by the input's uuid."""
    values = frozenset(SOURCE_LABELS)
    output = SubmissionFormat("kits21", "KiTS21 container", "test", re.compile(r"^.+$"), ".mha", values, values,
                              "{case}.mha", "<uuid>", source=CONTAINER_SOURCE)
    return ContainerInterface((InputSlot("images/ct", ".mha", "CT"),), "images/kidney-tumor-and-cyst", output,
                              CONTAINER_SOURCE)
