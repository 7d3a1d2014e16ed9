"""The algorithm container's entry point: ``nnunet-ext challenge-infer CHALLENGE --input DIR --output DIR ...``.

A challenge that runs containers (grand-challenge.org) mounts each job's images under ``/input`` in
the folders its interface names, with arbitrary (uuid) file names, and collects the outputs the
container writes under ``/output`` (:class:`~nnunet_ext.challenges.definition.ContainerInterface`,
from the challenge's module; facts and sources on its how-to page). For every input (or set of
inputs, one per channel) this module

1. checks everything before predicting: the model folder (dataset.json, plans.json, the checkpoint
   in every fold, its channels against the interface's inputs, its labels against what the
   challenge's output may hold, no cascade), the inputs (each decoded in full with the reader nnU-Net
   uses for the model's dataset, no NaN/Inf, the channels of a job on one grid) and the output folder
   (not an input folder);
2. predicts with nnU-Net's own predictor, configured as ``nnUNetv2_predict`` configures it (sliding
   window with Gaussian weighting, mirroring unless ``--disable_tta``, the fold ensemble, nnU-Net's
   export), one case after the other in this process (``predict_from_files_sequential``: a container
   job holds one case, and no worker processes are started); the prediction equals ``nnUNetv2_predict``'s
   on the same images;
3. writes each output in the interface's format (a label map, or a 4D stack of masks) under the
   first input's file name into the interface's output folder, through :mod:`nnunet_ext.atomic_io`
   (complete or absent; a file of the same name from an earlier run is replaced).

Inputs several per folder are paired by file name; when every input folder holds exactly one file
(one grand-challenge job), those files form the case whatever their names. nnU-Net's intermediate
files go to a temporary folder that is removed at the end.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from nnunet_ext import image_checks
from nnunet_ext.challenges import registry
from nnunet_ext.challenges.definition import ContainerInterface
from nnunet_ext.errors import UserFacingError


@dataclass(frozen=True)
class Job:
    """One case: its input files in channel order; outputs are named ``name`` (the first input's file name)."""

    name: str
    images: tuple[Path, ...]


def _stem(name: str, extension: str) -> str:
    return name[: -len(extension)]


def _inputs_of(root: Path, interface: ContainerInterface, index: int) -> dict[str, Path]:
    slot = interface.inputs[index]
    folder = root / slot.folder if slot.folder else root
    where = f"{slot.folder}/<uuid>{slot.extension}" if slot.folder else f"<name>{slot.extension}"
    if not folder.is_dir():
        raise UserFacingError(f"{folder} not found: the {interface.output.challenge} container reads its {slot.what} "
                              f"images from {where} below --input ({root}).")
    files = {path.name: path for path in sorted(folder.iterdir())
             if path.name.endswith(slot.extension) and not path.name.startswith(".") and not path.is_dir()}
    if not files:
        others = sorted(p.name for p in folder.iterdir())[:3]
        raise UserFacingError(f"no {slot.what} images in {folder}: expected {where} files"
                              + (f" (found {', '.join(others)})" if others else "") + ".")
    return files


def find_jobs(interface: ContainerInterface, input_root: str | os.PathLike) -> list[Job]:
    """The cases below ``input_root`` in the interface's layout, or a one-line refusal naming the file."""
    root = Path(input_root)
    if not root.is_dir():
        raise UserFacingError(f"--input {root} is not a folder.")
    slots = [_inputs_of(root, interface, index) for index in range(len(interface.inputs))]
    primary = interface.inputs[0]
    if len(slots) == 1:
        return [Job(name, (path,)) for name, path in slots[0].items()]
    if all(len(files) == 1 for files in slots):  # one job of grand-challenge: one file per input
        return [Job(next(iter(slots[0])), tuple(next(iter(files.values())) for files in slots))]
    jobs = []
    for name, path in slots[0].items():
        stem = _stem(name, primary.extension)
        images = [path]
        for slot, files in zip(interface.inputs[1:], slots[1:]):
            partner = files.get(stem + slot.extension)
            if partner is None:
                raise UserFacingError(f"{path} has no {slot.what} partner {slot.folder}/{stem}{slot.extension}: with "
                                      f"several cases per folder, the inputs of a case share their file name.")
            images.append(partner)
        jobs.append(Job(name, tuple(images)))
    for slot, files in zip(interface.inputs[1:], slots[1:]):
        stems = {_stem(name, primary.extension) for name in slots[0]}
        for name in files:
            if _stem(name, slot.extension) not in stems:
                raise UserFacingError(f"{files[name]} has no {primary.what} partner {primary.folder}/"
                                      f"{_stem(name, slot.extension)}{primary.extension}.")
    return jobs


# --- the model ------------------------------------------------------------------------------------


def check_model(interface: ContainerInterface, model_folder: Path, folds: Sequence[int | str] | None,
                checkpoint: str) -> tuple[dict, tuple]:
    """(the model's dataset.json, the folds to use) if the model fits the challenge, else a one-line refusal."""
    import json

    from nnunet_ext.tasks.predict import check_checkpoints, check_model_plans, read_model_dataset_json

    if not model_folder.is_dir():
        raise UserFacingError(f"{model_folder} is not a trained model folder: train it with nnUNetv2_train (or set "
                              f"nnUNet_results to the folder that holds Dataset.../Trainer__Plans__Configuration).")
    dataset_json = read_model_dataset_json(model_folder)
    check_model_plans(model_folder)
    check_model_fits(interface, dataset_json, json.loads((model_folder / "plans.json").read_text()),
                     model_folder.name, str(model_folder))
    return dataset_json, check_checkpoints(model_folder, folds, checkpoint)


def check_model_fits(interface: ContainerInterface, dataset_json: dict, plans: dict, folder_name: str,
                     where: str) -> None:
    """Refuse a model whose channels, labels or configuration the challenge's container cannot use."""
    title = interface.output.title
    channels = len(dataset_json.get("channel_names") or dataset_json.get("modality") or {})
    if channels != len(interface.inputs):
        wanted = ", ".join(slot.what for slot in interface.inputs)
        raise UserFacingError(f"{where}: the model takes {channels} input channel(s); the {title} receives "
                              f"{len(interface.inputs)} ({wanted}). Train on a dataset converted for this challenge "
                              f"(nnunet-ext convert).")
    values = image_checks.dataset_label_values(dataset_json)
    extra = sorted((values or set()) - interface.output.prediction_values)
    if values is None or extra:
        raise UserFacingError(f"{where}: the model predicts label values {sorted(values or [])}; the {title} output "
                              f"takes only {sorted(interface.output.prediction_values)}. Train on a dataset converted "
                              f"for this challenge and task.")
    configuration = folder_name.split("__")[-1]
    settings = (plans.get("configurations") or {}).get(configuration) or {}
    if settings.get("previous_stage"):
        raise UserFacingError(f"{where}: {configuration} is a cascade stage, which needs the predictions of "
                              f"{settings['previous_stage']} first; challenge-infer runs one configuration. Use "
                              f"3d_fullres, 3d_lowres or 2d.")


def model_folder_of(dataset: str, trainer: str, plans: str, configuration: str) -> Path:
    """``$nnUNet_results/DatasetXXX_NAME/TRAINER__PLANS__CONFIGURATION``, as nnUNetv2_predict finds it."""
    from nnunet_ext import compat

    if not os.environ.get("nnUNet_results"):
        raise UserFacingError("nnUNet_results is not set: point it at the folder holding the trained model "
                              "(in the container: the image's nnUNet_results).")
    try:
        return compat.trained_model_folder(dataset, trainer, plans, configuration)
    except (RuntimeError, ValueError) as error:
        raise UserFacingError(f"dataset {dataset!r} not found below nnUNet_results ({os.environ['nnUNet_results']}): "
                              f"{str(error).splitlines()[0]}") from None


# --- the run --------------------------------------------------------------------------------------


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserFacingError("-device cuda: no CUDA device is visible. Run the container with a GPU (docker run "
                              "--gpus all) or use -device cpu / auto.")
    return torch.device(name)


def _refuse_output_among_inputs(interface: ContainerInterface, input_root: Path, output_folder: Path) -> None:
    target = output_folder.resolve()
    for slot in interface.inputs:
        folder = (input_root / slot.folder if slot.folder else input_root).resolve()
        if target == folder:
            raise UserFacingError(f"the output folder {output_folder} is the input folder of the {slot.what} images, "
                                  f"which are only read. Give --output a different folder.")


def challenge_infer(challenge: str, task: str | None, input_root: str | os.PathLike, output_root: str | os.PathLike,
                    model_folder: str | os.PathLike, folds: Sequence[int | str] | None = None,
                    checkpoint: str = "checkpoint_final.pth", device: str = "auto", use_mirroring: bool = True,
                    log: Callable[[str], None] = print) -> list[Path]:
    """Predict every case below ``input_root`` and write it in the challenge's container format; the outputs."""
    from nnunet_ext import compat
    from nnunet_ext.challenges import submission

    interface = registry.container_interface(challenge, task)
    fmt = interface.output
    input_root, model_folder = Path(input_root), Path(model_folder)
    dataset_json, folds = check_model(interface, model_folder, folds, checkpoint)
    jobs = find_jobs(interface, input_root)
    output_folder = Path(output_root) / interface.output_folder if interface.output_folder else Path(output_root)
    _refuse_output_among_inputs(interface, input_root, output_folder)
    reader = image_checks.reader_for(dataset_json, jobs[0].images[0])
    for job in jobs:
        info = image_checks.check_case(job.images, reader)
        if info.spatial_dims != 3:
            raise UserFacingError(f"{job.images[0]}: a 2D image; {fmt.title} inputs are 3D.")
    torch_device = _device(device)
    log(f"{len(jobs)} case(s) of {fmt.title}: {model_folder} (folds {', '.join(map(str, folds))}, {checkpoint}) "
        f"on {torch_device.type}")
    with tempfile.TemporaryDirectory(prefix="nnunet-ext-infer-") as scratch:
        predictor = compat.predictor(0.5, use_mirroring, torch_device)
        predictor.initialize_from_trained_model_folder(os.fspath(model_folder), tuple(folds),
                                                       checkpoint_name=checkpoint)
        truncated = [os.path.join(scratch, f"case{index:05d}") for index in range(len(jobs))]
        predictor.predict_from_files_sequential([[os.fspath(p) for p in job.images] for job in jobs], truncated,
                                                save_probabilities=False, overwrite=True)
        output_folder.mkdir(parents=True, exist_ok=True)
        written = []
        for job, stem in zip(jobs, truncated):
            predicted = Path(stem + dataset_json["file_ending"])
            image, problem = submission.read_label_file(predicted)
            labels, problem = (None, f"{predicted.name} {problem}") if image is None else \
                submission.prediction_labels(fmt, predicted, image, job.images[0])
            if problem or labels is None:
                raise UserFacingError(f"{job.images[0]}: nnU-Net's prediction cannot be written as {fmt.title} "
                                      f"output: {problem}")
            target = output_folder / (_stem(job.name, interface.inputs[0].extension) + fmt.extension)
            submission.write_file(fmt, labels, image, target)
            written.append(target)
            log(f"{job.images[0]} -> {target}")
    return written
