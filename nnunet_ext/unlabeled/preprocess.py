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
* the properties gain ``nnunet_ext_unlabeled`` (source files with size and modification time, the
  plans stamp, the sizes of the stored files) and empty ``class_locations`` (nothing to oversample).

Checked before anything is written: every image still to be preprocessed is decoded in full with the
dataset's reader (:mod:`nnunet_ext.image_checks`: truncated or unreadable files, NaN/Inf) and
compared with the labelled training images (2D vs 3D, channels per file) and with its sibling
channels (shape, spacing, direction). A refusal names the file, the problem and the fix.

Crash-safe and resumable: one run per output folder at a time (a lock beside it; a second run
waits, then is refused). Each case is preprocessed in a private staging folder beside the output
and moved into place with the properties last, so a case is complete or absent; Ctrl-C removes the
unfinished case, and staging folders of killed runs are removed at the next start. A rerun skips
cases whose properties carry the current plans stamp, the same source files and stored files of the
recorded sizes, and redoes the rest. The manifest next to the folder is written last and lists the
cases the trainer uses; it is removed first when a case it lists is being redone.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from nnunet_ext import atomic_io, compat, image_checks
from nnunet_ext.parallel import imap, progress
from nnunet_ext.unlabeled.convention import (UNLABELED_IMAGES_FOLDER, UnlabeledCase, UnlabeledDataError,
                                             check_unique_case_names, list_unlabeled_cases, manifest_path,
                                             num_channels, unlabeled_preprocessed_folder)

PROPERTIES_KEY = "nnunet_ext_unlabeled"
MANIFEST_VERSION = 1
#: how long a second run on the same output waits for the first before it is refused
LOCK_TIMEOUT_S = 1800.0
COMMAND = "nnunet-ext preprocess-unlabeled"
_LEGACY_STAGING = ".staging"  # the shared staging folder of earlier nnunet-ext versions; removed when found


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


def source_fingerprint(files: Sequence[Path]) -> list[list]:
    """``[name, size, mtime_ns]`` of each source file: a changed image is preprocessed again."""
    fingerprint = []
    for path in files:
        status = Path(path).stat()
        fingerprint.append([Path(path).name, status.st_size, status.st_mtime_ns])
    return fingerprint


# --- checking the images ----------------------------------------------------------------------------

@dataclass(frozen=True)
class LabelledReference:
    """What the labelled training images look like, to compare the unlabelled ones with."""
    description: str                          # where it came from, for messages
    spatial_dims: int                         # 2 or 3
    channels_per_file: tuple[int, ...] | None  # None when no training image could be read


def first_training_case(raw_dataset: Path, dataset_json: dict) -> tuple[str, list[Path]] | None:
    """The first training case (by name) and its channel files, from dataset.json's ``dataset`` entries or
    from ``imagesTr`` (``CASE_XXXX<file_ending>``); None when none is on disk."""
    entries = dataset_json.get("dataset")
    if isinstance(entries, dict) and entries:
        identifier = sorted(entries)[0]
        files = [Path(os.path.expandvars(str(f))) for f in (entries[identifier] or {}).get("images", [])]
        files = [f if f.is_absolute() else raw_dataset / f for f in files]
    else:
        ending = dataset_json["file_ending"]
        first_channels = sorted((raw_dataset / "imagesTr").glob(f"*_0000{ending}"))
        if not first_channels:
            return None
        identifier = first_channels[0].name[: -len(f"_0000{ending}")]
        files = [raw_dataset / "imagesTr" / f"{identifier}_{c:04d}{ending}" for c in range(num_channels(dataset_json))]
    return (identifier, files) if files and all(f.is_file() for f in files) else None


def labelled_reference(raw_dataset: Path, dataset_json: dict, labelled_folder: Path, reader) -> LabelledReference:
    """Dimensionality and channels per file of the first training case (decoded with the dataset's reader);
    without raw training images, the dimensionality nnU-Net recorded in a preprocessed labelled case."""
    first = first_training_case(raw_dataset, dataset_json)
    if first is not None:
        identifier, files = first
        infos = [image_checks.check_case([file], reader) for file in files]
        return LabelledReference(f"training case {identifier} ({files[0].name})", infos[0].spatial_dims,
                                 tuple(info.channels for info in infos))
    for properties_file in sorted(labelled_folder.glob("*.pkl")):
        properties = compat.load_case_properties(properties_file)
        two_d = image_checks.is_two_d_spacing(properties["spacing"])
        return LabelledReference(f"preprocessed training case {properties_file.stem}", 2 if two_d else 3, None)
    raise UnlabeledDataError(f"{raw_dataset / 'imagesTr'} holds no training images and {labelled_folder} no "
                             f"preprocessed cases to compare the unlabelled images with. Preprocess the labelled "
                             f"data first.")


def check_unlabeled_case(case: UnlabeledCase, reader, reference: LabelledReference) -> None:
    """Decode every channel file in full and check it against the labelled data and its sibling channels."""
    first: image_checks.ImageInfo | None = None
    for index, path in enumerate(case.files):
        info = image_checks.check_case([path], reader, spatial_dims=reference.spatial_dims)
        expected = reference.channels_per_file[index] if reference.channels_per_file else None
        if expected is not None and info.channels != expected:
            raise UnlabeledDataError(
                f"{path}: holds {info.channels} channel(s) in one file, but channel file {index:04d} of the labelled "
                f"{reference.description} holds {expected}. Store the channels as imagesTr does (one file per "
                f"channel listed in dataset.json, CASE_0000, CASE_0001, ...).")
        if first is None:
            first = info
            continue
        problem = image_checks.same_grid(first, info)
        if problem:
            raise UnlabeledDataError(f"{path}: {problem}; every channel of a case must share one grid. Resample it "
                                     f"onto {first.path.name}'s grid.")


def check_unlabeled_images(cases: Sequence[UnlabeledCase], raw_dataset: Path, dataset_json: dict,
                           labelled_folder: Path) -> None:
    """Refuse the first bad image of ``cases`` (see :func:`check_unlabeled_case`); reads only."""
    if not cases:
        return
    reader = image_checks.reader_for(dataset_json, cases[0].files[0])
    reference = labelled_reference(raw_dataset, dataset_json, labelled_folder, reader)
    for case in cases:
        check_unlabeled_case(case, reader, reference)


# --- one case ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Job:
    case: UnlabeledCase
    output_folder: Path
    plans_manager: Any  # nnU-Net's PlansManager
    configuration_manager: Any  # nnU-Net's ConfigurationManager
    dataset_json: dict
    stamp: str


def _private_staging(output_folder: Path, identifier: str) -> Path:
    """A staging folder of this process beside the output (``atomic_io``'s naming, so that
    ``remove_stale_temporaries`` removes it once this process is gone)."""
    return atomic_io.private_folder(output_folder, identifier)


def _preprocess_into(job: _Job, staging: Path) -> None:
    """nnU-Net's preprocessor writes the case into ``staging``; our properties are added there."""
    preprocessor = compat.plans_preprocessor(job.configuration_manager)
    try:
        compat.preprocess_case_and_save(preprocessor, str(staging / job.case.identifier),
                                        [str(f) for f in job.case.files], job.plans_manager,
                                        job.configuration_manager, job.dataset_json)
    except Exception as error:
        raise UnlabeledDataError(
            f"nnU-Net's preprocessor failed on unlabelled case {job.case.identifier!r} "
            f"({', '.join(str(f) for f in job.case.files)}): {type(error).__name__}: "
            f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}. Check that the files are "
            f"readable images with the geometry of the labelled ones.") from None
    properties_file = staging / f"{job.case.identifier}.pkl"
    properties = compat.load_case_properties(properties_file)
    properties["class_locations"] = empty_class_locations(job.plans_manager, job.dataset_json)
    properties[PROPERTIES_KEY] = {
        "stamp": job.stamp, "source_files": [f.name for f in job.case.files],
        "source_fingerprint": source_fingerprint(job.case.files),
        "stored_files": {p.name: p.stat().st_size for p in staging.iterdir() if p.name != properties_file.name},
    }
    compat.save_case_properties(properties, properties_file)


def _move_case_into_place(staging: Path, folder: Path, identifier: str) -> None:
    """Move the staged files into ``folder``, properties last (they mark the case complete). An
    interrupted move removes what it moved, so the case is complete or absent."""
    files = sorted(staging.iterdir(), key=lambda p: p.suffix == ".pkl")
    (folder / f"{identifier}.pkl").unlink(missing_ok=True)  # an older version is incomplete from now on
    moved: list[Path] = []
    try:
        for path in files:
            atomic_io.move_into_place(path, folder / path.name)
            moved.append(folder / path.name)
    except BaseException:
        if len(moved) < len(files):
            for path in moved:
                path.unlink(missing_ok=True)
        raise


def _stage_case(job: _Job) -> tuple[str, Path]:
    """Preprocess one case into a new private staging folder (in a worker process, too)."""
    staging = _private_staging(job.output_folder, job.case.identifier)
    try:
        _preprocess_into(job, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return job.case.identifier, staging


def _place_case(job: _Job, staging: Path) -> None:
    """Move a staged case into the output (in the main process, which Ctrl-C reaches)."""
    try:
        _move_case_into_place(staging, job.output_folder, job.case.identifier)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def is_complete(folder: Path, case: UnlabeledCase, stamp: str) -> bool:
    """A case counts as done when its properties (moved last) carry the current plans stamp and the current
    source files, and every stored file it records is there with its recorded size."""
    properties_file = folder / f"{case.identifier}.pkl"
    if not properties_file.is_file():
        return False
    try:
        ours = compat.load_case_properties(properties_file).get(PROPERTIES_KEY, {})
        stored = dict(ours["stored_files"])
        if ours.get("stamp") != stamp or ours.get("source_fingerprint") != source_fingerprint(case.files):
            return False
        return bool(stored) and all((folder / name).is_file() and (folder / name).stat().st_size == size
                                    for name, size in stored.items())
    except Exception:  # noqa: BLE001 - unreadable or from an older version: simply redone
        return False


def read_manifest(unlabeled_folder: Path) -> dict | None:
    """The manifest of an unlabelled folder; None when there is none; a damaged one is refused."""
    path = manifest_path(unlabeled_folder)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("cases"), list) or "stamp" not in manifest:
            raise ValueError("not a manifest of nnunet-ext preprocess-unlabeled")
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UnlabeledDataError(f"{path} is damaged ({str(error).splitlines()[0][:120]}). Run `{COMMAND}` for this "
                                 f"dataset and configuration again: it checks the preprocessed cases and writes the "
                                 f"manifest anew.") from None
    return manifest


# --- the command ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Target:
    """One output folder: a configuration's plans and where its unlabelled cases go."""
    configuration: str
    plans_manager: Any  # nnU-Net's PlansManager
    configuration_manager: Any  # nnU-Net's ConfigurationManager
    folder: Path
    stamp: str


def _read_json(path: Path, what: str, fix: str) -> dict:
    try:
        content = json.loads(path.read_text())
        if not isinstance(content, dict):
            raise ValueError("not a JSON object")
        return content
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UnlabeledDataError(f"{path}: {what} cannot be read ({str(error).splitlines()[0][:120]}). "
                                 f"{fix}") from None


def _load_plans(preprocessed_dataset: Path, dataset_id: str, plans_identifier: str, configuration: str):
    plans_file = preprocessed_dataset / f"{plans_identifier}.json"
    command = (f"`nnUNetv2_plan_and_preprocess -d {dataset_id} -c {configuration}` (or `nnunet-ext plan -d "
               f"{dataset_id} -pl <Planner> -c {configuration}` for one of our planners)")
    if not plans_file.is_file():
        raise UnlabeledDataError(
            f"Plans {plans_file} not found: the labelled data must be planned and preprocessed first. Run "
            f"{command}, then this command again.")
    plans = _read_json(plans_file, "the plans", f"Plan the dataset again: {command}.")
    try:
        return compat.plans_and_configuration(plans, configuration)
    except KeyError as error:
        raise UnlabeledDataError(f"{plans_file}: {error.args[0]}. Pick one of those with -c.") from None


def _target(preprocessed_dataset: Path, dataset_id: str, plans_identifier: str, configuration: str,
            dataset_json: dict, cases: list[UnlabeledCase], raw_dataset: Path) -> _Target:
    """Plans of one configuration, checked to be preprocessed, and the unlabelled output folder."""
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
    identifier = configuration_manager.data_identifier
    if not isinstance(identifier, str) or not identifier or "/" in identifier or identifier.startswith("."):
        plans_file = preprocessed_dataset / f"{plans_identifier}.json"
        raise UnlabeledDataError(f"{plans_file}: configuration {configuration} has data_identifier {identifier!r}, "
                                 f"which is not a folder name. Plan the dataset again (or fix it in the plans).")
    folder = unlabeled_preprocessed_folder(preprocessed_dataset, identifier)
    return _Target(configuration, plans_manager, configuration_manager, folder,
                   plans_stamp(plans_manager, configuration_manager, dataset_json))


def _todo(target: _Target, cases: list[UnlabeledCase], overwrite: bool) -> list[UnlabeledCase]:
    return [case for case in cases if overwrite or not is_complete(target.folder, case, target.stamp)]


def preprocess_unlabeled(dataset: int | str, configurations: Sequence[str], plans_identifier: str = "nnUNetPlans",
                         num_processes: int = 1, overwrite: bool = False) -> list[PreprocessResult]:
    """Preprocess ``imagesUnlabeled`` of ``dataset`` for each configuration; see the module docstring.

    The folders are nnU-Net's (``nnUNet_raw``, ``nnUNet_preprocessed``, read when called). With
    ``overwrite`` every case is redone (still only inside the unlabelled folder). Everything is checked
    before anything is written.
    """
    raw_root = Path(os.environ.get("nnUNet_raw", ""))
    preprocessed_root = Path(os.environ.get("nnUNet_preprocessed", ""))
    try:
        name = compat.dataset_name(dataset)
    except (RuntimeError, ValueError) as error:
        expected = f"Dataset{int(dataset):03d}_<Name>" if str(dataset).isdigit() else str(dataset)
        first = str(error).strip().splitlines()[0] if str(error).strip() else f"Dataset {dataset} not found."
        raise UnlabeledDataError(f"{first} Expected a folder {expected} in {raw_root} (nnUNet_raw).") from None
    raw_dataset, preprocessed_dataset = raw_root / name, preprocessed_root / name
    dataset_id = str(dataset)
    dataset_json_file = preprocessed_dataset / "dataset.json"
    plan_command = f"`nnUNetv2_plan_and_preprocess -d {dataset_id} -c {' '.join(configurations)}`"
    if not dataset_json_file.is_file():
        raise UnlabeledDataError(f"{dataset_json_file} not found: {name} has not been planned yet. Run "
                                 f"{plan_command} first.")
    dataset_json = _read_json(dataset_json_file, "dataset.json", f"Plan the dataset again: {plan_command}.")
    cases = list_unlabeled_cases(raw_dataset, dataset_json)
    targets: dict[str, _Target] = {}
    for configuration in configurations:
        target = _target(preprocessed_dataset, dataset_id, plans_identifier, configuration, dataset_json, cases,
                         raw_dataset)
        targets.setdefault(target.folder.name, target)  # e.g. 3d_cascade_fullres shares 3d_fullres' folder
    pending = {case.identifier: case for target in targets.values() for case in _todo(target, cases, overwrite)}
    first_target = next(iter(targets.values()))
    check_unlabeled_images(sorted(pending.values(), key=lambda c: c.identifier), raw_dataset, dataset_json,
                           preprocessed_dataset / first_target.configuration_manager.data_identifier)
    return [_preprocess_target(target, cases, plans_identifier, dataset_json, num_processes, overwrite)
            for target in targets.values()]


def _preprocess_target(target: _Target, cases: list[UnlabeledCase], plans_identifier: str, dataset_json: dict,
                       num_processes: int, overwrite: bool) -> PreprocessResult:
    """Under the output's lock: clear leftovers of killed runs, preprocess what is missing, write the manifest."""
    folder = target.folder
    with atomic_io.exclusive(folder, COMMAND, timeout=LOCK_TIMEOUT_S):
        folder.mkdir(parents=True, exist_ok=True)
        atomic_io.remove_stale_temporaries(folder.parent)
        atomic_io.remove_stale_temporaries(folder)
        shutil.rmtree(folder / _LEGACY_STAGING, ignore_errors=True)
        todo = _todo(target, cases, overwrite)  # again: another run may have finished while we waited
        print(f"{target.configuration}: {len(cases)} unlabelled case(s), {len(cases) - len(todo)} already "
              f"preprocessed, {len(todo)} to do -> {folder}", flush=True)
        manifest = manifest_path(folder)
        listed = _listed_cases(manifest)
        if listed & {case.identifier for case in todo}:
            manifest.unlink()  # it would list a case that is being replaced
        processed = _run_jobs([_Job(case, folder, target.plans_manager, target.configuration_manager, dataset_json,
                                    target.stamp) for case in todo], num_processes)
        identifiers = tuple(case.identifier for case in cases)
        _note_stale(folder, identifiers)
        _write_manifest(manifest, {
            "nnunet_ext_unlabeled_manifest": MANIFEST_VERSION,
            "plans_identifier": plans_identifier, "configuration": target.configuration,
            "data_identifier": target.configuration_manager.data_identifier, "stamp": target.stamp,
            "num_cases": len(identifiers), "cases": list(identifiers),
        })
    return PreprocessResult(target.configuration, folder, manifest, identifiers, tuple(processed))


def _run_jobs(jobs: list[_Job], num_processes: int) -> list[str]:
    """Stage every case (in ``num_processes`` worker processes, :func:`nnunet_ext.parallel.imap`: spawned as
    nnU-Net's preprocessing, Ctrl-C handled here) and move each into place as it is ready; a progress bar
    on a terminal, one line per case otherwise."""
    done: list[str] = []
    by_identifier = {job.case.identifier: job for job in jobs}
    try:
        # closing: Ctrl-C stops the worker processes at once, not when the generator is collected
        with contextlib.closing(imap(_stage_case, jobs, num_processes, ordered=False)) as staged, \
                progress(total=len(jobs), desc="preprocessing unlabelled cases") as bar:
            for identifier, staging in staged:
                _place_case(by_identifier[identifier], staging)
                done.append(identifier)
                if bar.disable:  # no terminal: a line per case for the log
                    print(f"  [{len(done)}/{len(jobs)}] {identifier}", flush=True)
                bar.update()
    finally:
        if num_processes > 1 and len(jobs) > 1:
            atomic_io.remove_stale_temporaries(jobs[0].output_folder.parent)  # staging folders of ended workers
    return done


def _listed_cases(manifest: Path) -> set[str]:
    """Cases an existing manifest lists; a damaged manifest lists nothing (it is rewritten at the end)."""
    try:
        return set(json.loads(manifest.read_text()).get("cases", []))
    except (OSError, ValueError, AttributeError, TypeError):
        return set()


def _note_stale(folder: Path, identifiers: tuple[str, ...]) -> None:
    stale = sorted(set(p.name[:-4] for p in folder.glob("*.pkl")) - set(identifiers))
    if stale:
        print(f"  note: {len(stale)} preprocessed case(s) are no longer in {UNLABELED_IMAGES_FOLDER} and are not used: "
              f"{', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}", flush=True)


def _write_manifest(path: Path, content: dict) -> None:
    """Written through the atomic write path, and not at all when it already says the same."""
    try:
        if json.loads(path.read_text()) == content:
            return
    except (OSError, ValueError):
        pass
    atomic_io.write_json(path, content)
