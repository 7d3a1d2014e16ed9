"""Every touch point with nnU-Net internals, in one place.

nnU-Net's Python API moves between minor releases (``build_network_architecture`` changed in 2.3
and 2.7, ``unpack_dataset`` went away in 2.6). The rest of nnunet-ext calls nnU-Net through the
functions here and through the documented trainer hooks only, so supporting the next nnU-Net
release is a change to this file. Tested range: nnunetv2 >= 2.8.1, < 2.9 (see pyproject.toml).

Imports of nnunetv2 and torch happen inside the functions: the CLI's cheap commands and the
start-up hook must not pay for them.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

SUPPORTED_NNUNET = ((2, 8, 1), (2, 9, 0))  # [min, max)
NNUNET_PATH_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def nnunet_version() -> str:
    from importlib.metadata import version

    return version("nnunetv2")


def version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def nnunet_version_supported(text: str | None = None) -> bool:
    found = version_tuple(text or nnunet_version())
    return SUPPORTED_NNUNET[0] <= found < SUPPORTED_NNUNET[1]


# --- trainers -----------------------------------------------------------------------------------

def base_trainer_class() -> type[Any]:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    return nnUNetTrainer


def instantiate_trainer(trainer_class, plans: dict, configuration: str, fold: int, dataset_json: dict,
                        device, continue_training: bool = False):
    """Create a trainer as ``nnUNetv2_train`` does. nnU-Net 2.8 passes the resume flag inside the
    plans dict (the constructor pops ``continue_training``), so the plans are copied first."""
    plans = dict(plans, continue_training=continue_training)
    return trainer_class(plans, configuration, fold, dataset_json, device)


def network_from_plans(class_name: str, arch_kwargs: dict, kwargs_requiring_import: Sequence[str],
                       input_channels: int, output_channels: int, deep_supervision: bool = True):
    """Build a network from a plans' class path and keyword arguments, as nnU-Net's trainer does."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    return get_network_from_plans(class_name, arch_kwargs, kwargs_requiring_import, input_channels,
                                  output_channels, allow_init=True, deep_supervision=deep_supervision)


def deep_supervision_loss(loss, weights):
    """nnU-Net's deep-supervision wrapper: ``sum_i weights[i] * loss(outputs[i], targets[i])``."""
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    return DeepSupervisionWrapper(loss, weights)


def dice_ce_loss(batch_dice: bool, ignore_label: int | None = None, ddp: bool = False):
    """nnU-Net's softmax Dice + cross-entropy (no background in Dice), as its trainer builds it for labels."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    return DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": ddp}, {},
                          weight_ce=1, weight_dice=1, ignore_label=ignore_label, dice_class=MemoryEfficientSoftDiceLoss)


def find_trainer_class(name: str):
    """nnU-Net's own trainer lookup (its tree, then ``nnUNet_extTrainer``), as the stock CLI does it."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    return recursive_find_trainer_class_by_name(name)


def nnunet_trainer_folder() -> Path:
    """The folder nnU-Net searches first for trainers; names found there shadow ours."""
    import nnunetv2

    return Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"


def experiment_planner_class() -> type[Any]:
    """nnU-Net's default ``ExperimentPlanner``, the base our method planners subclass."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    return ExperimentPlanner


def pad_shape(shape: Sequence[int], must_be_divisible_by: Sequence[int]) -> list[int]:
    """nnU-Net's planner rule: ``shape`` rounded up to multiples of ``must_be_divisible_by``."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import pad_shape as nnunet_pad_shape

    return [int(edge) for edge in nnunet_pad_shape(shape, must_be_divisible_by)]


def soft_dice_loss_class() -> type[Any]:
    """nnU-Net's ``MemoryEfficientSoftDiceLoss`` class (softmax Dice, ``apply_nonlin`` and ``do_bg`` options)."""
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    return MemoryEfficientSoftDiceLoss


def trainer_for_ddp_test(dataset: str, configuration: str, fold: int, trainer: str, plans: str,
                         continue_training: bool, ddp_wrapper, device):
    """A trainer exactly as ``nnUNetv2_train`` builds it inside one DDP worker, with nnU-Net's ``DDP``
    wrapper replaced by ``ddp_wrapper`` and the device set to ``device`` (used by the CPU DDP test
    harness, :mod:`nnunet_ext.testing.ddp`; nnU-Net hard-codes CUDA there). The checkpoint is loaded
    as ``--c`` would."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    trainer_module.DDP = ddp_wrapper
    nnunet_trainer = get_trainer_from_args(dataset, configuration, fold, trainer, plans, continue_training)
    nnunet_trainer.device = device
    nnunet_trainer.grad_scaler = None
    maybe_load_checkpoint(nnunet_trainer, continue_training, False)
    return nnunet_trainer


#: the checkpoints ``nnUNetv2_train --c`` looks for in a fold folder, in the order it tries them
CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
#: what ``nnUNetTrainer.load_checkpoint`` reads from every checkpoint (``grad_scaler_state`` only under AMP)
CHECKPOINT_LOADED_KEYS = ("network_weights", "optimizer_state", "logging", "_best_ema", "current_epoch", "init_args")


class UnreadableCheckpoint(Exception):
    """A checkpoint file that cannot be loaded; the message says why (empty, truncated, ...)."""


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load an nnU-Net checkpoint; memory-mapped, so reading one extra key is cheap."""
    import torch

    return torch.load(path, map_location=map_location, weights_only=False, mmap=True)


def unwrapped_network(trainer):
    """The trainer's network without DDP's ``.module`` and torch.compile's ``_orig_mod`` wrappers:
    the module whose ``state_dict`` nnU-Net saves and loads."""
    from torch._dynamo import OptimizedModule

    module = trainer.network.module if trainer.is_ddp else trainer.network
    return module._orig_mod if isinstance(module, OptimizedModule) else module


def nnunet_checkpoint(trainer) -> dict | None:
    """The dict ``nnUNetTrainer.save_checkpoint`` would save for ``trainer`` (same keys, same values),
    or None where nnU-Net saves nothing: on processes other than local rank 0, and with
    checkpointing disabled (logged with nnU-Net's message). tests/test_checkpoint_safety.py compares
    it with nnU-Net's own save, so a release that changes the checkpoint fails there."""
    if trainer.local_rank != 0:
        return None
    if trainer.disable_checkpointing:
        trainer.print_to_log_file("No checkpoint written, checkpointing is disabled")
        return None
    return {
        "network_weights": unwrapped_network(trainer).state_dict(),
        "optimizer_state": trainer.optimizer.state_dict(),
        "grad_scaler_state": trainer.grad_scaler.state_dict() if trainer.grad_scaler is not None else None,
        "logging": trainer.logger.get_checkpoint(),
        "_best_ema": trainer._best_ema,
        "current_epoch": trainer.current_epoch + 1,
        "init_args": trainer.my_init_kwargs,
        "trainer_name": type(trainer).__name__,
        "inference_allowed_mirroring_axes": trainer.inference_allowed_mirroring_axes,
    }


def write_checkpoint(checkpoint: dict, path: str | os.PathLike, *, durable: bool = True) -> None:
    """``torch.save`` once, through the atomic write path: ``path`` holds its previous complete file or
    the new complete one at every instant (a temporary file beside it, fsynced, then ``os.replace``).
    ``durable=False`` skips the fsyncs (still atomic against a killed process, not against power loss)."""
    import torch

    from nnunet_ext.atomic_io import atomic_path

    with atomic_path(path, durable=durable) as temporary:
        # a path, not a Python file object: torch's own file writer is ~10% faster than its writes through
        # Python; the archive's internal record prefix is then the temporary's name, which torch.load ignores
        torch.save(checkpoint, temporary)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def check_checkpoint_archive(path: str | os.PathLike) -> None:
    """Raise UnreadableCheckpoint unless ``path`` is a complete torch.save archive whose records match
    their CRC-32 checksums (a 0-byte, truncated or overwritten file fails; records saved without a
    checksum, CRC 0 when torch's ``compute_crc32`` is off, are only read to their end)."""
    import zipfile

    try:
        size = os.path.getsize(path)
    except OSError as error:
        raise UnreadableCheckpoint(f"cannot be read ({_first_line(error)})") from None
    if size == 0:
        raise UnreadableCheckpoint("is empty (0 bytes)")
    try:
        with zipfile.ZipFile(path) as archive:
            for record in archive.infolist():
                if not record.CRC:
                    # zipfile then skips the comparison for this record (typeshed types CRC as int only)
                    record.CRC = None  # type: ignore[assignment]
                with archive.open(record) as stream:  # zipfile compares the CRC-32 at the end
                    while stream.read(1 << 22):
                        pass
    except (PermissionError, FileNotFoundError, IsADirectoryError) as error:
        raise UnreadableCheckpoint(f"cannot be read ({_first_line(error)})") from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as error:
        raise UnreadableCheckpoint(f"is truncated, corrupt or not a PyTorch checkpoint ({size} bytes; "
                                   f"{_first_line(error)})") from None


def read_intact_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """``read_checkpoint`` for a file that must be a complete nnU-Net checkpoint; raises
    UnreadableCheckpoint (its message says what is wrong) for a missing, empty, truncated or corrupt
    file and for one without the keys nnU-Net's ``load_checkpoint`` reads."""
    check_checkpoint_archive(path)
    try:
        checkpoint = read_checkpoint(path, map_location)
    except Exception as error:  # noqa: BLE001 - whatever torch raises, the file cannot be loaded
        raise UnreadableCheckpoint(f"cannot be loaded ({_first_line(error)})") from None
    missing = [key for key in CHECKPOINT_LOADED_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise UnreadableCheckpoint(f"is not an nnU-Net checkpoint (it has no {', '.join(map(repr, missing))})")
    return checkpoint


def image_reader_writer(dataset_json: dict | None, example_file: str):
    """An instance of the image reader/writer nnU-Net uses for a dataset (``overwrite_image_reader_writer``
    or the file ending), or for ``example_file`` alone when there is no dataset.json."""
    from nnunetv2.imageio.reader_writer_registry import (determine_reader_writer_from_dataset_json,
                                                         determine_reader_writer_from_file_ending)

    # Without an example file nnU-Net picks by name and file ending only: trying the example prints a
    # traceback per reader when the file is bad, and the checks that follow give the message.
    name = Path(example_file).name
    ending = "." + ".".join(name.split(".")[-2:]) if name.endswith(".gz") else Path(name).suffix
    if dataset_json is not None:
        ending = dataset_json.get("file_ending", ending)
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints which reader it chose
        if dataset_json is not None and dataset_json.get("overwrite_image_reader_writer"):
            return determine_reader_writer_from_dataset_json(dataset_json, None)()
        return determine_reader_writer_from_file_ending(ending, None, verbose=False)()


# --- datasets and folders -------------------------------------------------------------------------

def dataset_name(dataset_name_or_id: int | str) -> str:
    """``5`` or ``Dataset005_X`` -> ``Dataset005_X`` (looks in the nnU-Net folders)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    return maybe_convert_to_dataset_name(dataset_name_or_id)


def trained_model_folder(dataset: int | str, trainer: str, plans: str, configuration: str) -> Path:
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    return Path(get_output_folder(dataset_name(dataset), trainer, plans, configuration))


# --- planning and preprocessing -------------------------------------------------------------------

class _Finished:
    """What ``Pool.starmap_async`` returns, for a call that has already run."""

    def __init__(self, value: object) -> None:
        self.value = value

    def ready(self) -> bool:
        return True

    def get(self, timeout: float | None = None) -> object:
        return self.value


class _SerialPool:
    """Stands in for a ``multiprocessing.Pool``: the same calls, run here one after another."""

    _pool: list = []  # nnU-Net checks that its pool's workers are alive: there are none

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __enter__(self) -> _SerialPool:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def starmap(self, function, iterable) -> list:
        return [function(*arguments) for arguments in iterable]

    def starmap_async(self, function, iterable) -> _Finished:
        return _Finished(self.starmap(function, iterable))


class _SerialContext:
    """``multiprocessing`` as nnU-Net's planning modules use it (``get_context(...).Pool``), serial."""

    Pool = _SerialPool

    def get_context(self, method: str | None = None) -> _SerialContext:
        return self


@contextlib.contextmanager
def pools_in_this_process() -> Iterator[None]:
    """nnU-Net's integrity check, fingerprint extraction, preprocessing and evaluation always start a
    spawn pool, even of one worker, and each worker imports torch and nnU-Net again (7-10 s of CPU on
    2 cores). For a few small images that is most of the time; inside this block those modules run the
    same functions in this process instead. Module attributes are swapped for the block: not for use
    from two threads."""
    import importlib

    serial: Any = _SerialContext()
    swaps = [("nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor", "multiprocessing", serial),
             ("nnunetv2.experiment_planning.verify_dataset_integrity", "multiprocessing", serial),
             ("nnunetv2.preprocessing.preprocessors.default_preprocessor", "multiprocessing", serial),
             ("nnunetv2.evaluation.evaluate_predictions", "multiprocessing", serial),
             ("nnunetv2.utilities.utils", "Pool", _SerialPool)]  # lists a dataset's files with a pool of 12
    saved = []
    try:
        for module_name, attribute, stand_in in swaps:
            module = importlib.import_module(module_name)
            saved.append((module, attribute, getattr(module, attribute)))
            setattr(module, attribute, stand_in)
        yield
    finally:
        for module, attribute, value in saved:
            setattr(module, attribute, value)


def _worker_pools(num_processes: int) -> contextlib.AbstractContextManager[None]:
    """nnU-Net's own pools for 1 or more processes; 0 runs their work in this process."""
    if num_processes < 0:
        raise ValueError(f"num_processes must be 0 (this process) or more, not {num_processes}")
    return pools_in_this_process() if num_processes == 0 else contextlib.nullcontext()


def extract_fingerprint(dataset_id: int, num_processes: int, check_integrity: bool = True,
                        overwrite: bool = False) -> dict:
    """nnU-Net's fingerprint extraction (and integrity check); ``num_processes`` 0: in this process."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset

    with _worker_pools(num_processes):
        return extract_fingerprint_dataset(dataset_id, num_processes=max(1, num_processes),
                                           check_dataset_integrity=check_integrity, clean=overwrite)


def nnunet_planner_class(name: str):
    """One of nnU-Net's own experiment planners by class name, or None."""
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    return recursive_find_python_class(str(Path(nnunetv2.__path__[0]) / "experiment_planning"), name,
                                       current_module="nnunetv2.experiment_planning")


def plan_dataset(dataset_id: int, planner_class, gpu_memory_target_in_gb: float | None = None,
                 plans_name: str | None = None) -> str:
    """Run an ExperimentPlanner subclass (ours or nnU-Net's); returns the plans identifier."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset

    _, plans_identifier = plan_experiment_dataset(dataset_id, planner_class,
                                                  gpu_memory_target_in_gb=gpu_memory_target_in_gb,
                                                  overwrite_plans_name=plans_name)
    return plans_identifier


def preprocess(dataset_id: int, plans_identifier: str, configurations: Sequence[str], num_processes: int) -> None:
    """nnU-Net's preprocessing of the training cases; ``num_processes`` 0: in this process."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    with _worker_pools(num_processes):
        preprocess_dataset(dataset_id, plans_identifier, list(configurations),
                           [max(1, num_processes)] * len(configurations))


# --- training, inference, evaluation -----------------------------------------------------------------

def train(dataset_id: int, configuration: str, fold: int, trainer: str, plans_identifier: str, device) -> None:
    """What ``nnUNetv2_train`` does, in-process (the trainer is found by nnU-Net's lookup)."""
    from nnunetv2.run.run_training import run_training

    run_training(str(dataset_id), configuration, fold, trainer_class_name=trainer,
                 plans_identifier=plans_identifier, device=device)


def predict_folder(model_folder: str | os.PathLike, input_folder: str | os.PathLike,
                   output_folder: str | os.PathLike, folds: Sequence[int], device,
                   num_processes: int = 1, checkpoint: str = "checkpoint_final.pth") -> None:
    """What ``nnUNetv2_predict`` does, through nnU-Net's predictor (sliding window, export).

    ``num_processes`` 0 is ``-npp 0 -nps 0``: everything in this process, no worker to start."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=device, perform_everything_on_device=device.type != "cpu",
                                allow_tqdm=True)
    predictor.initialize_from_trained_model_folder(os.fspath(model_folder), tuple(folds), checkpoint_name=checkpoint)
    if num_processes == 0:
        os.makedirs(output_folder, exist_ok=True)  # nnUNetv2_predict makes it before this call; the call does not
        predictor.predict_from_files_sequential(os.fspath(input_folder), os.fspath(output_folder))
    else:
        predictor.predict_from_files(os.fspath(input_folder), os.fspath(output_folder),
                                     num_processes_preprocessing=num_processes,
                                     num_processes_segmentation_export=num_processes)


def evaluate_folder(reference_folder: str | os.PathLike, prediction_folder: str | os.PathLike,
                    dataset_json: str | os.PathLike, plans_json: str | os.PathLike,
                    output_file: str | os.PathLike, num_processes: int = 1) -> dict:
    """nnU-Net's evaluator (``nnUNetv2_evaluate_folder``); returns the summary.json it wrote.
    ``num_processes`` 0: in this process."""
    import json

    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder2

    with _worker_pools(num_processes):
        compute_metrics_on_folder2(os.fspath(reference_folder), os.fspath(prediction_folder), os.fspath(dataset_json),
                                   os.fspath(plans_json), output_file=os.fspath(output_file),
                                   num_processes=max(1, num_processes))
    with open(output_file) as file:
        return json.load(file)


def nnunet_planner_names() -> list[str]:
    """Class names of nnU-Net's own experiment planners (for 'did you mean' messages)."""
    import importlib
    import inspect
    import pkgutil

    from nnunetv2.experiment_planning.experiment_planners import default_experiment_planner
    import nnunetv2.experiment_planning.experiment_planners as planners_package

    base = default_experiment_planner.ExperimentPlanner
    names: set[str] = set()
    for module_info in pkgutil.walk_packages(planners_package.__path__, planners_package.__name__ + "."):
        try:
            module = importlib.import_module(module_info.name)
        except Exception:  # noqa: BLE001 - a broken optional planner must not break the listing
            continue
        names.update(name for name, obj in inspect.getmembers(module, inspect.isclass)
                     if issubclass(obj, base))
    return sorted(names)


# --- unlabelled data (nnunet_ext.unlabeled, trainers/semi_supervised.py) ---------------------------

def plans_and_configuration(plans: dict, configuration: str):
    """(PlansManager, ConfigurationManager) for a plans dict; an unknown configuration raises KeyError
    listing the ones the plans have."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    if configuration not in manager.available_configurations:
        raise KeyError(f"configuration {configuration!r} is not in the plans; they have "
                       f"{list(manager.available_configurations)}")
    return manager, manager.get_configuration(configuration)


def plans_preprocessor(configuration_manager, verbose: bool = False):
    """An instance of the preprocessor class the plans name (``preprocessor_name``), as nnU-Net's
    ``nnUNetv2_preprocess`` creates it."""
    preprocessor = configuration_manager.preprocessor_class(verbose=verbose)
    preprocessor.show_progress_bar = False
    return preprocessor


def preprocess_case_and_save(preprocessor, output_filename_truncated: str, image_files: Sequence[str],
                             plans_manager, configuration_manager, dataset_json: dict) -> None:
    """nnU-Net's per-case preprocessing + storage (``run_case_save``) for a case without a label file:
    same transpose, crop, normalisation and resampling as a training case, written in the format the
    plans' preprocessor writes (blosc2 in 2.8). The segmentation it stores is nnU-Net's nonzero mask
    (-1 outside, 0 inside), not a label map; the properties have no ``class_locations``."""
    preprocessor.run_case_save(output_filename_truncated, list(image_files), None, plans_manager,
                               configuration_manager, dataset_json)


def dataset_class_of_folder(folder: str | os.PathLike):
    """nnU-Net's dataset class (blosc2 or npz) for a preprocessed folder, from its file endings."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    return infer_dataset_class(os.fspath(folder))


def nnunet_base_dataset_class() -> type[Any]:
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetBaseDataset

    return nnUNetBaseDataset


def load_case_properties(path: str | os.PathLike) -> dict:
    """A preprocessed case's ``.pkl`` (nnU-Net stores properties with pickle)."""
    from batchgenerators.utilities.file_and_folder_operations import load_pickle

    return load_pickle(os.fspath(path))


def save_case_properties(properties: dict, path: str | os.PathLike) -> None:
    """nnU-Net's pickle writer, through our atomic write path."""
    from batchgenerators.utilities.file_and_folder_operations import write_pickle

    from nnunet_ext.atomic_io import write_with

    write_with(path, lambda temporary: write_pickle(properties, os.fspath(temporary)))


def nnunet_data_loader_class() -> type[Any]:
    """nnU-Net's patch sampler (``nnUNetDataLoader``): crops, foreground oversampling, per-sample transforms."""
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

    return nnUNetDataLoader


def trainer_data_transforms(trainer) -> tuple[Any, Any, tuple[int, ...]]:
    """(training transforms, validation transforms, initial patch size) exactly as nnU-Net's
    ``nnUNetTrainer.get_dataloaders`` builds them, through the trainer's own overridable hooks
    (``configure_rotation_dummyDA_mirroring_and_inital_patch_size``, ``get_training_transforms``,
    ``get_validation_transforms``), so a trainer that changes its augmentation changes both streams."""
    deep_supervision_scales = trainer._get_deep_supervision_scales()
    rotation, dummy_2d, initial_patch_size, mirror_axes = \
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    labels = trainer.label_manager
    regions = labels.foreground_regions if labels.has_regions else None
    train = trainer.get_training_transforms(
        trainer.configuration_manager.patch_size, rotation, deep_supervision_scales, mirror_axes, dummy_2d,
        use_mask_for_norm=trainer.configuration_manager.use_mask_for_norm, is_cascaded=trainer.is_cascaded,
        foreground_labels=labels.foreground_labels, regions=regions, ignore_label=labels.ignore_label)
    validation = trainer.get_validation_transforms(deep_supervision_scales, is_cascaded=trainer.is_cascaded,
                                                   foreground_labels=labels.foreground_labels, regions=regions,
                                                   ignore_label=labels.ignore_label)
    return train, validation, tuple(int(i) for i in initial_patch_size)


def augmentation_processes() -> int:
    """nnU-Net's number of augmentation workers per GPU (``nnUNet_n_proc_DA`` or its host table)."""
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    return get_allowed_n_proc_DA()


def background_augmenter(loader, num_processes: int, num_cached: int, pin_memory: bool):
    """The augmenter nnU-Net's trainer wraps a loader in: single-threaded for 0 processes, else
    batchgenerators' NonDetMultiThreadedAugmenter (transforms already run inside the loader)."""
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter

    if num_processes == 0:
        return SingleThreadedAugmenter(loader, None)
    return NonDetMultiThreadedAugmenter(data_loader=loader, transform=None, num_processes=num_processes,
                                        num_cached=num_cached, seeds=None, pin_memory=pin_memory, wait_time=0.002)


def finish_augmenter(augmenter) -> None:
    """Stop an augmenter's worker processes (nnU-Net does this in ``on_train_end``)."""
    finish = getattr(augmenter, "_finish", None)
    if finish is not None:
        finish()


def distributed_world() -> tuple[int, int]:
    """(world size, rank) under nnU-Net's DDP training, (1, 0) otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def training_autocast(device):
    """The mixed-precision context nnU-Net's ``train_step`` uses: autocast on CUDA, nothing elsewhere."""
    from torch import autocast
    from nnunetv2.utilities.helpers import dummy_context

    return autocast(device.type, enabled=True) if device.type == "cuda" else dummy_context()


# --- constant learning rate (trainers/mcnet.py, trainers/class_sam.py); ClassSAM's case loading ----

def constant_lr_scheduler(optimizer, initial_lr: float, num_epochs: int):
    """A constant learning rate with nnU-Net's scheduler interface (``step(epoch)`` at every epoch
    start, logged as nnU-Net logs it): its PolyLRScheduler with exponent 0."""
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

    return PolyLRScheduler(optimizer, initial_lr, num_epochs, exponent=0.0)


def load_preprocessed_case(dataset, identifier: str):
    """(image ``(C, Z, Y, X)`` float32, label ``(1, Z, Y, X)``) of a preprocessed case, as numpy arrays, from
    an nnU-Net dataset object (``load_case`` returns data, seg, previous-stage seg, properties in 2.8)."""
    import numpy as np

    data, seg, _, _ = dataset.load_case(identifier)
    return np.asarray(data[:], dtype=np.float32), np.asarray(seg[:])


# --- multi-task data (nnunet_ext.tasks, trainers/universal.py) ----------------------------------

def case_metrics(reference_file: str, prediction_file: str, reader_writer, labels: Sequence[int],
                 ignore_label: int | None = None) -> dict:
    """nnU-Net's per-case metrics (Dice, IoU, TP/FP/FN, ...) for the given labels."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics

    return compute_metrics(reference_file, prediction_file, reader_writer, list(labels), ignore_label)


def save_summary(summary: dict, path: str | os.PathLike) -> None:
    """Write a summary.json in nnU-Net's format (what find_best_configuration reads)."""
    from copy import deepcopy

    from nnunetv2.evaluation.evaluate_predictions import save_summary_json
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export

    summary = deepcopy(summary)
    recursive_fix_for_json_export(summary)  # numpy scalars from the per-case metrics
    from nnunet_ext.atomic_io import write_with

    write_with(path, lambda temporary: save_summary_json(summary, os.fspath(temporary)))


def predictor(tile_step_size: float = 0.5, use_mirroring: bool = True, device=None, verbose: bool = False):
    """nnU-Net's sliding-window predictor, configured as ``nnUNetv2_predict`` configures it."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    return nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                           perform_everything_on_device=(device or torch.device("cpu")).type == "cuda",
                           device=device or torch.device("cpu"), verbose=verbose, verbose_preprocessing=False,
                           allow_tqdm=True)


# --- several label maps from one sliding-window pass (nnunet-ext predict --task all) ----------------

def compile_requested() -> bool:
    """nnU-Net's switch for torch.compile (``nnUNet_compile``), read as its predictor reads it."""
    return os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t")


class _StackedHeads:
    """The predictor's label manager, reporting ``heads`` segmentation heads: nnU-Net's sliding window
    sizes its logit buffer by ``num_segmentation_heads`` and nothing else here."""

    def __init__(self, label_manager, heads: int) -> None:
        self._label_manager, self.num_segmentation_heads = label_manager, heads

    def __getattr__(self, name: str):
        return getattr(self._label_manager, name)


@contextlib.contextmanager
def stacked_predictor(predictor, network, channels: int):
    """nnU-Net's initialised ``predictor`` with ``network`` in place of the model's for the block: a
    network whose output stacks several label maps' logits, ``channels`` in all. nnU-Net loads every
    fold's weights into it (``network.load_state_dict`` must take the model's state dicts) and sizes its
    sliding-window buffer by ``channels``; under ``nnUNet_compile`` it is compiled as nnU-Net compiles
    its own."""
    import torch

    saved = predictor.network, predictor.label_manager
    predictor.network = torch.compile(network) if compile_requested() else network
    predictor.label_manager = _StackedHeads(saved[1], channels)
    try:
        yield
    finally:
        predictor.network, predictor.label_manager = saved


def predict_stacked_outputs(predictor, network, block_channels: Sequence[int], image_files: Sequence[Sequence[str]],
                            output_files: Sequence[Sequence[str]], num_processes_preprocessing: int = 1,
                            num_processes_export: int = 1) -> None:
    """nnU-Net's prediction with a stacked ``network`` (:func:`stacked_predictor`) whose channel block ``b``
    holds ``block_channels[b]`` classes' logits (e.g. one block per task of a universal model): for each
    case ``image_files[i]``, nnU-Net's preprocessing, its ``predict_logits_from_preprocessed_data`` (every
    fold, sliding window, Gaussian weighting, mirroring, fold average), then nnU-Net's export (resampling,
    argmax, writer) of block ``b`` to ``output_files[i][b]`` (a path without file ending, as nnU-Net's
    output names): a label map of the block's class indices 0 .. block_channels[b] - 1."""
    import multiprocessing
    from time import sleep

    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.utilities.file_path_utilities import check_workers_alive_and_busy

    offsets = [sum(block_channels[:b]) for b in range(len(block_channels) + 1)]
    # each block exported as a dataset of its classes (consecutive, background first, no regions, no ignore)
    block_json = [{"labels": {"background": 0, **{f"class_{c}": c for c in range(1, count)}},
                   "file_ending": predictor.dataset_json["file_ending"]} for count in block_channels]
    with stacked_predictor(predictor, network, offsets[-1]):
        keys = [str(i) for i in range(len(image_files))]
        iterator = predictor._internal_get_data_iterator_from_lists_of_filenames(
            [list(map(os.fspath, files)) for files in image_files], None, keys, max(1, num_processes_preprocessing))
        with multiprocessing.get_context("spawn").Pool(max(1, num_processes_export)) as pool:
            # nnU-Net's check_workers_alive_and_busy takes the pool's private worker list (not in typeshed)
            workers = list(pool._pool)  # type: ignore[attr-defined]
            pending: list[multiprocessing.pool.AsyncResult] = []
            for item in iterator:
                while check_workers_alive_and_busy(pool, workers, pending, allowed_num_queued=2 * len(block_json)):
                    sleep(0.1)  # as nnU-Net: bounded memory when prediction outpaces export
                logits = predictor.predict_logits_from_preprocessed_data(item["data"]).cpu().numpy()
                for block, target in enumerate(output_files[int(item["ofile"])]):
                    pending.append(pool.apply_async(export_prediction_from_logits, (
                        logits[offsets[block]:offsets[block + 1]], item["data_properties"],
                        predictor.configuration_manager, predictor.plans_manager, block_json[block],
                        os.fspath(target), False)))
            for result in pending:
                result.get()


def probabilities_resampled_by_interpolation(predictor) -> bool:
    """Does the model's export resample logits by linear interpolation (nnU-Net's default, order 1; a
    convex combination, so a logit below another everywhere stays below it)?"""
    kwargs = predictor.configuration_manager.configuration.get("resampling_fn_probabilities_kwargs") or {}
    return int(kwargs.get("order", 1)) <= 1 and int(kwargs.get("order_z", 0)) <= 1


# --- predict --task: nnUNetv2_predict's options, each case's blocks exported in one job ------------

def nnunet_predictor(tile_step_size: float = 0.5, use_mirroring: bool = True, device=None,
                     perform_everything_on_device: bool = True, verbose: bool = False, allow_tqdm: bool = True):
    """nnU-Net's predictor built exactly as ``nnUNetv2_predict`` builds it from its flags (``-step_size``,
    ``--disable_tta``, ``-device``, ``--not_on_device``, ``--verbose``, ``--disable_progress_bar``).
    ``perform_everything_on_device`` applies to CUDA only (nnU-Net switches it off elsewhere, with a
    warning that is not repeated here)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    device = device or torch.device("cpu")
    return nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                           perform_everything_on_device=perform_everything_on_device and device.type == "cuda",
                           device=device, verbose=verbose, verbose_preprocessing=verbose, allow_tqdm=allow_tqdm)


def previous_stage_name(predictor) -> str | None:
    """The configuration a cascaded model's input needs predictions of (``3d_cascade_fullres``), else None."""
    return getattr(predictor.configuration_manager, "previous_stage_name", None)


def _block_labels(num_classes: int) -> dict:
    """A block's classes as a dataset.json's labels (consecutive, background first, no regions, no ignore)."""
    return {"labels": {"background": 0, **{f"class_{c}": c for c in range(1, num_classes)}}}


def export_stacked_case(logits, properties: dict, configuration_manager, plans_manager, block_channels: Sequence[int],
                        save_probabilities: bool, case_id: str, write_case) -> None:
    """One case's stacked logits -> per block what nnU-Net's ``export_prediction_from_logits`` computes before
    writing (``convert_predicted_logits_to_segmentation_with_correct_shape``: resampling to the original grid,
    softmax with probabilities, argmax, uncropping, transposing back), then
    ``write_case(case_id, blocks, properties, reader_writer)`` with ``blocks[b] = (segmentation of block b's class
    indices, its probabilities or None)`` and the plans' image reader/writer, the one nnU-Net's export writes with.
    Runs in an export process (or in-process for the sequential route)."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    offsets = [sum(block_channels[:b]) for b in range(len(block_channels) + 1)]
    blocks = []
    for block, count in enumerate(block_channels):
        label_manager = plans_manager.get_label_manager(_block_labels(count))
        converted = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits[offsets[block]:offsets[block + 1]], plans_manager, configuration_manager, label_manager,
            properties, return_probabilities=save_probabilities)
        blocks.append(converted if save_probabilities else (converted, None))
    write_case(case_id, blocks, properties, plans_manager.image_reader_writer_class())


def predict_stacked_cases(predictor, network, block_channels: Sequence[int],
                          image_files: Sequence[Sequence[str | os.PathLike]], case_ids: Sequence[str], write_case,
                          save_probabilities: bool = False,
                          num_processes_preprocessing: int = 3, num_processes_export: int = 3) -> None:
    """nnU-Net's ``predict_from_files`` with a stacked ``network`` (:func:`stacked_predictor`) whose channel
    block ``b`` holds ``block_channels[b]`` classes' logits (e.g. one block per task of a universal model).

    For each case ``image_files[i]``: nnU-Net's preprocessing, its ``predict_logits_from_preprocessed_data``
    (every fold, sliding window, Gaussian weighting, mirroring, fold average), then one export job
    (:func:`export_stacked_case`) that hands every block's segmentation (and probabilities) to
    ``write_case(case_ids[i], ...)``, which must be picklable. As ``nnUNetv2_predict``: ``-npp``/``-nps``
    background processes (at most two jobs queued per export process), or, with both 0, everything in this
    process (nnU-Net's ``predict_from_files_sequential``)."""
    import multiprocessing
    from time import sleep

    import torch
    from nnunetv2.utilities.file_path_utilities import check_workers_alive_and_busy

    def job(item) -> tuple:
        logits = predictor.predict_logits_from_preprocessed_data(item["data"]).cpu().numpy()
        return (logits, item["data_properties"], predictor.configuration_manager, predictor.plans_manager,
                list(block_channels), save_probabilities, item["ofile"], write_case)

    paths = [[os.fspath(file) for file in files] for files in image_files]
    with stacked_predictor(predictor, network, sum(block_channels)):
        if num_processes_preprocessing == 0 and num_processes_export == 0:
            preprocessor = predictor.configuration_manager.preprocessor_class(verbose=predictor.verbose)
            for files, case_id in zip(paths, case_ids):
                data, _, properties = preprocessor.run_case(files, None, predictor.plans_manager,
                                                            predictor.configuration_manager, predictor.dataset_json)
                export_stacked_case(*job({"data": torch.from_numpy(data), "data_properties": properties,
                                          "ofile": case_id}))
            return
        iterator = predictor._internal_get_data_iterator_from_lists_of_filenames(
            paths, None, list(case_ids), max(1, num_processes_preprocessing))
        with multiprocessing.get_context("spawn").Pool(max(1, num_processes_export)) as pool:
            workers = list(pool._pool)  # type: ignore[attr-defined]  # as nnU-Net: to notice a killed worker
            pending: list = []
            for item in iterator:
                while check_workers_alive_and_busy(pool, workers, pending, allowed_num_queued=2):
                    sleep(0.1)  # as nnU-Net: bounded memory when prediction outpaces export
                pending.append(pool.apply_async(export_stacked_case, job(item)))
            for result in pending:
                while True:
                    if not all(worker.is_alive() for worker in workers):
                        raise RuntimeError("An export process died (as nnU-Net says: likely killed by the OS for "
                                           "lack of RAM); use fewer with -nps.")
                    try:
                        result.get(timeout=0.1)
                        break
                    except multiprocessing.TimeoutError:
                        pass


# --- -pretrained_weights (nnunet_ext.pretrained) ------------------------------------------------------

def route_pretrained_weights(loader) -> None:
    """Make ``nnUNetv2_train ... -pretrained_weights FILE`` call ``loader(network, fname, verbose,
    nnunet_loader)`` instead of nnU-Net's ``load_pretrained_weights(network, fname, verbose)``.

    nnU-Net has no hook for it: ``run_training.maybe_load_checkpoint`` initialises the trainer and
    calls the function it imported from ``nnunetv2.run.load_pretrained_weights`` by its module-global
    name, so that name is rebound in ``nnunetv2.run.run_training`` (looked up at call time; trainer
    modules are imported before it runs, in the DDP workers too). ``nnunet_loader`` is nnU-Net's own
    function, for the networks the loader leaves to it. Idempotent."""
    import nnunetv2.run.run_training as run_training

    current = run_training.load_pretrained_weights
    if getattr(current, "nnunet_ext_loader", None) is loader:
        return
    nnunet_loader = getattr(current, "nnunet_loader", current)

    def load_pretrained_weights(network, fname, verbose=False):
        return loader(network, fname, verbose, nnunet_loader)

    # attributes on the function mark it as ours (mypy does not model attributes set on a function)
    load_pretrained_weights.nnunet_ext_loader = loader  # type: ignore[attr-defined]
    load_pretrained_weights.nnunet_loader = nnunet_loader  # type: ignore[attr-defined]
    run_training.load_pretrained_weights = load_pretrained_weights


def network_as_trainer_builds_it(trainer_class, plans: dict, dataset_json: dict, configuration: str,
                                 meta: bool = False):
    """The network nnU-Net's predictor builds for a model folder (``initialize_from_trained_model_folder``):
    ``trainer_class.build_network_architecture`` for the plans' configuration, the dataset's input channels
    and segmentation heads, deep supervision off; on the meta device with ``meta`` (no memory, no init)."""
    import torch
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    input_channels = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    output_channels = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    with torch.device("meta") if meta else contextlib.nullcontext():
        return trainer_class.build_network_architecture(plans_manager, configuration_manager, input_channels,
                                                        output_channels, enable_deep_supervision=False)
