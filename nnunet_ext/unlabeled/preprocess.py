"""Preprocess ``imagesUnlabeled`` with a dataset's own plans (``nnunet-ext preprocess-unlabeled``).

Every case goes through the preprocessor class the plans name (``preprocessor_name``; nnU-Net's
``DefaultPreprocessor`` unless a planner chose another) and its own ``run_case_save``, with the
dataset's plans, configuration and dataset.json: the same transpose, crop-to-nonzero, normalisation
(with the labelled data's intensity statistics) and resampling as the labelled cases, stored in the
same format. So an image gives identical arrays whether it sits in imagesTr or in imagesUnlabeled.

What differs from a labelled case (see ``convention`` for the layout):

* it goes to ``<data_identifier>_unlabeled/``; nnU-Net's labelled folder is never written;
* the stored segmentation is nnU-Net's nonzero mask for a case without labels (-1 outside the
  body, 0 inside), which the augmentation needs for masked normalisation; it is not a label map and
  the two-stream loader never returns it as a target;
* the properties gain ``nnunet_ext_unlabeled`` (source files, plans stamp) and empty
  ``class_locations`` (nothing to oversample).

Resumable: each case is written into a private staging folder and moved into place, properties
last, so a case is either complete or absent; a rerun skips complete cases made with the same
plans (the stamp) and redoes the rest. The manifest next to the folder is written last and lists
the cases the trainer uses, so stale files of images removed from imagesUnlabeled are ignored.
Run one preprocess-unlabeled per dataset at a time (a new run clears the staging folder).
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nnunet_ext import compat
from nnunet_ext.unlabeled.convention import (UNLABELED_IMAGES_FOLDER, UnlabeledCase, UnlabeledDataError,
                                             check_unique_case_names, list_unlabeled_cases, manifest_path,
                                             unlabeled_preprocessed_folder)

PROPERTIES_KEY = "nnunet_ext_unlabeled"
STAGING = ".staging"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class PreprocessResult:
    configuration: str
    folder: Path
    manifest: Path
    cases: tuple[str, ...]
    processed: tuple[str, ...]  # done in this run (the others were complete already)


#: the keys of a plans configuration that decide nnU-Net's preprocessed arrays (what nnU-Net's
#: preprocessor reads); patch size, batch size and the architecture do not, so editing them (custom
#: plans with a larger patch, say) leaves preprocessed unlabelled cases valid, as nnU-Net's own
PREPROCESSING_KEYS = ("data_identifier", "preprocessor_name", "spacing", "normalization_schemes",
                      "use_mask_for_norm", "resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_seg",
                      "resampling_fn_seg_kwargs")


def plans_stamp(plans_manager, configuration_manager, dataset_json: dict) -> str:
    """A short hash of everything that decides a preprocessed array: if the plans change, cases preprocessed
    with the old plans are redone (by preprocess-unlabeled) or refused (by the trainer)."""
    relevant = {
        "configuration": {key: configuration_manager.configuration.get(key) for key in PREPROCESSING_KEYS},
        "intensity": plans_manager.plans.get("foreground_intensity_properties_per_channel"),
        "transpose_forward": plans_manager.plans.get("transpose_forward"),
        "reader": plans_manager.plans.get("image_reader_writer"),
        "channels": dataset_json.get("channel_names", dataset_json.get("modality")),
        "labels": dataset_json.get("labels"),
        "file_ending": dataset_json.get("file_ending"),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def empty_class_locations(plans_manager, dataset_json: dict) -> dict:
    """``class_locations`` with every key nnU-Net's sampler may ask for and no locations, so even a stock
    nnUNetDataLoader falls back to random crops on these cases instead of failing on a missing key."""
    labels = plans_manager.get_label_manager(dataset_json)
    keys = [tuple(r) if isinstance(r, (list, tuple)) else r for r in
            (labels.foreground_regions if labels.has_regions else labels.foreground_labels)]
    if labels.has_ignore_label:
        keys.append(tuple([-1] + labels.all_labels))
    return {key: [] for key in keys}


@dataclass(frozen=True)
class _Job:
    case: UnlabeledCase
    output_folder: Path
    plans_manager: object
    configuration_manager: object
    dataset_json: dict
    stamp: str


def _run_job(job: _Job) -> str:
    """Preprocess one case into its own staging folder, then move it into place (properties last)."""
    staging = job.output_folder / STAGING / job.case.identifier
    if staging.exists():
        shutil.rmtree(staging)  # our own leftover from an interrupted run
    staging.mkdir(parents=True)
    preprocessor = compat.plans_preprocessor(job.configuration_manager)
    try:
        compat.preprocess_case_and_save(preprocessor, str(staging / job.case.identifier),
                                        [str(f) for f in job.case.files], job.plans_manager,
                                        job.configuration_manager, job.dataset_json)
    except Exception as error:
        raise UnlabeledDataError(
            f"nnU-Net's preprocessor failed on unlabelled case {job.case.identifier!r} "
            f"({', '.join(str(f) for f in job.case.files)}): {type(error).__name__}: {error}. Check that the "
            f"files are readable images with the geometry of the labelled ones (nnUNetv2_plan_and_preprocess "
            f"--verify_dataset_integrity checks imagesTr the same way).") from error
    properties_file = staging / f"{job.case.identifier}.pkl"
    properties = compat.load_case_properties(properties_file)
    properties["class_locations"] = empty_class_locations(job.plans_manager, job.dataset_json)
    properties[PROPERTIES_KEY] = {"stamp": job.stamp, "source_files": [f.name for f in job.case.files]}
    compat.save_case_properties(properties, properties_file)
    for path in sorted(staging.iterdir(), key=lambda p: p.suffix == ".pkl"):  # .pkl last marks completion
        os.replace(path, job.output_folder / path.name)
    staging.rmdir()
    return job.case.identifier


def is_complete(folder: Path, identifier: str, stamp: str) -> bool:
    """A case counts as done when its properties (written last) carry the current plans stamp."""
    properties_file = folder / f"{identifier}.pkl"
    if not properties_file.is_file():
        return False
    try:
        properties = compat.load_case_properties(properties_file)
    except Exception:  # noqa: BLE001 - a truncated file is simply redone
        return False
    return properties.get(PROPERTIES_KEY, {}).get("stamp") == stamp


def read_manifest(unlabeled_folder: Path) -> dict | None:
    path = manifest_path(unlabeled_folder)
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _write_json_atomically(data: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _load_plans(preprocessed_dataset: Path, dataset_id: str, plans_identifier: str, configuration: str):
    plans_file = preprocessed_dataset / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise UnlabeledDataError(
            f"Plans {plans_file} not found: the labelled data must be planned and preprocessed first. Run "
            f"`nnUNetv2_plan_and_preprocess -d {dataset_id} -c {configuration}` (or `nnunet-ext plan -d {dataset_id} "
            f"-pl <Planner> -c {configuration}` for one of our planners), then this command again.")
    try:
        return compat.plans_and_configuration(json.loads(plans_file.read_text()), configuration)
    except KeyError as error:
        raise UnlabeledDataError(f"{plans_file}: {error.args[0]}. Pick one of those with -c.") from None


def preprocess_unlabeled(dataset: int | str, configurations: Sequence[str], plans_identifier: str = "nnUNetPlans",
                         num_processes: int = 1, overwrite: bool = False) -> list[PreprocessResult]:
    """Preprocess ``imagesUnlabeled`` of ``dataset`` for each configuration; see the module docstring.

    The folders are nnU-Net's (``nnUNet_raw``, ``nnUNet_preprocessed``, read when called). With
    ``overwrite`` every case is redone (still only inside the unlabelled folder).
    """
    raw_root = Path(os.environ.get("nnUNet_raw", ""))
    preprocessed_root = Path(os.environ.get("nnUNet_preprocessed", ""))
    try:
        name = compat.dataset_name(dataset)
    except RuntimeError as error:
        expected = f"Dataset{int(dataset):03d}_<Name>" if str(dataset).isdigit() else str(dataset)
        raise UnlabeledDataError(f"{error}\nExpected a folder {expected} in {raw_root} (nnUNet_raw).") from None
    raw_dataset, preprocessed_dataset = raw_root / name, preprocessed_root / name
    dataset_id = str(dataset)
    dataset_json_file = preprocessed_dataset / "dataset.json"
    if not dataset_json_file.is_file():
        raise UnlabeledDataError(
            f"{dataset_json_file} not found: {name} has not been planned yet. Run `nnUNetv2_plan_and_preprocess -d "
            f"{dataset_id} -c {' '.join(configurations)}` first.")
    dataset_json = json.loads(dataset_json_file.read_text())
    cases = list_unlabeled_cases(raw_dataset, dataset_json)
    results, done_identifiers = [], set()
    for configuration in configurations:
        plans_manager, configuration_manager = _load_plans(preprocessed_dataset, dataset_id, plans_identifier,
                                                           configuration)
        labeled_folder = preprocessed_dataset / configuration_manager.data_identifier
        if not labeled_folder.is_dir() or not any(p.suffix == ".pkl" for p in labeled_folder.iterdir()):
            raise UnlabeledDataError(
                f"{labeled_folder} is missing or empty: configuration {configuration} of plans {plans_identifier} "
                f"has not been preprocessed. Run `nnUNetv2_preprocess -d {dataset_id} -plans_name {plans_identifier} "
                f"-c {configuration}` first (the unlabelled images use its plans and intensity statistics).")
        check_unique_case_names([c.identifier for c in cases],
                                compat.dataset_class_of_folder(labeled_folder).get_identifiers(str(labeled_folder)),
                                raw_dataset)
        if configuration_manager.data_identifier in done_identifiers:  # e.g. 3d_cascade_fullres shares 3d_fullres'
            continue
        done_identifiers.add(configuration_manager.data_identifier)
        results.append(_preprocess_configuration(cases, configuration, plans_identifier, plans_manager,
                                                 configuration_manager, dataset_json, preprocessed_dataset,
                                                 num_processes, overwrite))
    return results


def _preprocess_configuration(cases: list[UnlabeledCase], configuration: str, plans_identifier: str, plans_manager,
                              configuration_manager, dataset_json: dict, preprocessed_dataset: Path,
                              num_processes: int, overwrite: bool) -> PreprocessResult:
    folder = unlabeled_preprocessed_folder(preprocessed_dataset, configuration_manager.data_identifier)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / STAGING).is_dir():
        shutil.rmtree(folder / STAGING)  # our own half-written cases of an interrupted run (one run at a time)
    stamp = plans_stamp(plans_manager, configuration_manager, dataset_json)
    todo = [case for case in cases if overwrite or not is_complete(folder, case.identifier, stamp)]
    print(f"{configuration}: {len(cases)} unlabelled case(s), {len(cases) - len(todo)} already preprocessed, "
          f"{len(todo)} to do -> {folder}", flush=True)
    jobs = [_Job(case, folder, plans_manager, configuration_manager, dataset_json, stamp) for case in todo]
    processed = []
    if num_processes <= 1 or len(jobs) <= 1:
        for index, job in enumerate(jobs, start=1):
            processed.append(_run_job(job))
            print(f"  [{index}/{len(jobs)}] {job.case.identifier}", flush=True)
    else:
        # spawn, as nnU-Net's own preprocessing: no forked torch/thread state in the workers
        with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
            for index, identifier in enumerate(pool.imap_unordered(_run_job, jobs), start=1):
                processed.append(identifier)
                print(f"  [{index}/{len(jobs)}] {identifier}", flush=True)
    if (folder / STAGING).is_dir() and not any((folder / STAGING).iterdir()):
        (folder / STAGING).rmdir()
    identifiers = tuple(case.identifier for case in cases)
    stale = sorted(set(p.name[:-4] for p in folder.glob("*.pkl")) - set(identifiers))
    if stale:
        print(f"  note: {len(stale)} preprocessed case(s) are no longer in {UNLABELED_IMAGES_FOLDER} and are not used: "
              f"{', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}", flush=True)
    manifest = manifest_path(folder)
    _write_json_atomically({
        "nnunet_ext_unlabeled_manifest": MANIFEST_VERSION,
        "plans_identifier": plans_identifier, "configuration": configuration,
        "data_identifier": configuration_manager.data_identifier, "stamp": stamp,
        "num_cases": len(identifiers), "cases": list(identifiers),
    }, manifest)
    return PreprocessResult(configuration, folder, manifest, identifiers, tuple(processed))
