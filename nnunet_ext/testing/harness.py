"""End-to-end harness: a temporary nnU-Net root with the synthetic dataset, and the stock CLI.

Every method's tests use it the same way: make a root, then ``run_stock_pipeline(root, trainer)``
runs ``nnUNetv2_plan_and_preprocess``, ``nnUNetv2_train``, ``nnUNetv2_predict`` and
``nnUNetv2_evaluate_folder`` as subprocesses, exactly as a user types them, and
``check_pipeline_outputs`` asserts on what they wrote. Short schedules come from the
``NNUNET_EXT_*`` variables, so trainers run unmodified.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nnunet_ext.datasets.synthetic import SyntheticSpec, dataset_folder_name, write_synthetic_dataset

HARNESS_DATASET_ID = 991
HARNESS_DATASET_NAME = "HarnessAbdomen"
# Small enough for seconds per CPU iteration, big enough for nnU-Net to plan a 3-4 stage U-Net.
HARNESS_SPEC = SyntheticSpec(num_training=6, num_test=2, shape=(16, 40, 40), spacing=(2.5, 1.0, 1.0))


@dataclass(frozen=True)
class NnUNetRoot:
    """A self-contained nnU-Net folder set (raw, preprocessed, results) holding one dataset."""

    path: Path
    dataset_id: int
    dataset_name: str

    @property
    def raw(self) -> Path:
        return self.path / "nnUNet_raw"

    @property
    def preprocessed(self) -> Path:
        return self.path / "nnUNet_preprocessed"

    @property
    def results(self) -> Path:
        return self.path / "nnUNet_results"

    @property
    def dataset_raw(self) -> Path:
        return self.raw / self.dataset_name

    def env(self, epochs: int = 1, iterations: int = 2, validation_iterations: int = 1, **extra: str) -> dict:
        """Environment for a stock command: this root's folders, a short schedule, CPU-friendly workers.

        nnUNet_extTrainer is deliberately not set here: discovery must come from the installed hook.
        """
        env = dict(os.environ)
        env.update({
            "nnUNet_raw": str(self.raw), "nnUNet_preprocessed": str(self.preprocessed),
            "nnUNet_results": str(self.results),
            "NNUNET_EXT_NUM_EPOCHS": str(epochs), "NNUNET_EXT_ITERS_PER_EPOCH": str(iterations),
            "NNUNET_EXT_VAL_ITERS": str(validation_iterations),
            "nnUNet_n_proc_DA": env.get("nnUNet_n_proc_DA", "1"), "nnUNet_compile": "false",
            # nnU-Net's final validation spawns this many export workers (default 8), each importing
            # torch: tens of seconds per training run on a 2-core machine for nothing
            "nnUNet_def_n_proc": env.get("nnUNet_def_n_proc", "1"),
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2"),
        })
        env.update(extra)
        return env


UNIVERSAL_DATASET_ID = 974
UNIVERSAL_DATASET_NAME = "Universal"


def make_universal_root(base: str | os.PathLike, dataset_id: int = UNIVERSAL_DATASET_ID) -> NnUNetRoot:
    """A root holding the synthetic partially labelled family (1, 2 and 4 channels) and its merge."""
    from nnunet_ext.datasets.multi_dataset import DEFAULT_DATASET_IDS, write_multi_dataset
    from nnunet_ext.tasks.merge import merge_datasets

    root = NnUNetRoot(Path(base), dataset_id, dataset_folder_name(dataset_id, UNIVERSAL_DATASET_NAME))
    for folder in (root.raw, root.preprocessed, root.results):
        folder.mkdir(parents=True, exist_ok=True)
    write_multi_dataset(root.raw)
    merge_datasets(root.raw, list(DEFAULT_DATASET_IDS), dataset_id, UNIVERSAL_DATASET_NAME)
    return root


def load_trainer(root: NnUNetRoot, trainer_class, monkeypatch, results: str | os.PathLike | None = None,
                 plans: str = "nnUNetPlans", configuration: str = "3d_fullres", fold: int = 0,
                 continue_training: bool = False):
    """A trainer created in-process as ``nnUNetv2_train`` creates it, on CPU, for unit tests.

    ``monkeypatch`` (pytest's) points nnU-Net's folder variables at the root for the test only.
    """
    import torch

    from nnunet_ext import compat

    for variable, folder in [("nnUNet_raw", root.raw), ("nnUNet_preprocessed", root.preprocessed),
                             ("nnUNet_results", results or root.results)]:
        monkeypatch.setenv(variable, str(folder))
    plans_dict = json.loads((root.preprocessed / root.dataset_name / f"{plans}.json").read_text())
    dataset_json = json.loads((root.preprocessed / root.dataset_name / "dataset.json").read_text())
    return compat.instantiate_trainer(trainer_class, plans_dict, configuration, fold, dataset_json,
                                      torch.device("cpu"), continue_training)


def make_nnunet_root(base: str | os.PathLike, dataset_id: int = HARNESS_DATASET_ID,
                     name: str = HARNESS_DATASET_NAME, spec: SyntheticSpec = HARNESS_SPEC) -> NnUNetRoot:
    root = NnUNetRoot(Path(base), dataset_id, dataset_folder_name(dataset_id, name))
    for folder in (root.raw, root.preprocessed, root.results):
        folder.mkdir(parents=True, exist_ok=True)
    write_synthetic_dataset(root.raw, dataset_id, name, spec)
    return root


def stock_command(name: str) -> str:
    """Path of an installed console script (nnUNetv2_*, nnunet-ext) of this interpreter's environment."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def run_stock(arguments: Sequence[object], env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a command like a user would; on failure, raise with the command and its output's tail."""
    command = [stock_command(str(arguments[0])), *map(str, arguments[1:])]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if completed.returncode != 0:
        output = (completed.stdout + completed.stderr)[-6000:]
        raise AssertionError(f"`{' '.join(command)}` failed with exit status {completed.returncode}:\n{output}")
    return completed


def plan_and_preprocess(root: NnUNetRoot, configuration: str = "3d_fullres", plans: str = "nnUNetPlans") -> None:
    """Stock planning + preprocessing, once per root and plans (later calls reuse the result)."""
    if (root.preprocessed / root.dataset_name / f"{plans}.json").is_file() and \
            (root.preprocessed / root.dataset_name / f"{plans}_{configuration}").is_dir():
        return
    # -npfp 1: nnU-Net's fingerprint extraction otherwise spawns 8 processes, each importing torch and nnU-Net
    # (about 15 s on 2 cores for a dataset of a few tiny cases)
    run_stock(["nnUNetv2_plan_and_preprocess", "-d", root.dataset_id, "-c", configuration, "-np", 1, "-npfp", 1,
               "--verify_dataset_integrity"], root.env())


def train_stock(root: NnUNetRoot, trainer: str, configuration: str = "3d_fullres", fold: int = 0,
                plans: str = "nnUNetPlans", epochs: int = 1, iterations: int = 2, **env: str) -> Path:
    """``nnUNetv2_train`` on CPU with a short schedule (``env`` adds variables); returns the model folder."""
    variables = root.env(epochs=epochs, iterations=iterations)
    variables.update(env)
    run_stock(["nnUNetv2_train", root.dataset_id, configuration, fold, "-tr", trainer, "-p", plans, "-device", "cpu"],
              variables)
    return root.results / root.dataset_name / f"{trainer}__{plans}__{configuration}"


def predict_task_and_check(root: NnUNetRoot, trainer: str, source_index: int, output: Path,
                           configuration: str = "3d_fullres", fold: int = 0, default_inference: bool = False) -> Path:
    """``nnunet-ext predict --task`` on one source dataset of the universal family, then checks that
    every test case got a prediction on its reference's grid holding only the source's own label
    values. Returns the source dataset's raw folder (for further checks by the caller).

    As in :func:`run_stock_pipeline`, the prediction runs in one process without mirroring unless
    ``default_inference``."""
    from nnunet_ext.datasets.multi_dataset import DEFAULT_DATASET_IDS, DEFAULT_SOURCES

    source_folder = next(root.raw.glob(f"Dataset{DEFAULT_DATASET_IDS[source_index]:03d}_*"))
    run_stock(["nnunet-ext", "predict", "--task", DEFAULT_SOURCES[source_index].name, "-i", source_folder / "imagesTs",
               "-o", output, "-d", root.dataset_id, "-c", configuration, "-f", fold, "-tr", trainer,
               "-device", "cpu", *_inference_options(default_inference)], root.env())
    dataset_json = json.loads((source_folder / "dataset.json").read_text())
    labels = set(dataset_json["labels"].values())
    references = sorted((source_folder / "labelsTs").glob(f"*{dataset_json['file_ending']}"))
    assert references, f"no test labels in {source_folder}"
    for reference in references:
        check_prediction(output / reference.name, reference, dataset_json, labels)
    return source_folder


def _inference_options(default_inference: bool) -> list[object]:
    """Prediction options: nnU-Net's defaults but one worker each, or one process without mirroring."""
    return ["-npp", 1, "-nps", 1] if default_inference else ["-npp", 0, "-nps", 0, "--disable_tta"]


def check_prediction(prediction: Path, reference: Path, dataset_json: dict, label_values: set) -> None:
    """``prediction`` exists, lies on ``reference``'s grid (shape and spacing as the dataset's reader/writer
    reads them) and holds only ``label_values``."""
    import numpy as np

    from nnunet_ext import image_io

    assert prediction.is_file(), f"no prediction for {reference.name}"
    rw = image_io.reader_writer(dataset_json, reference)
    predicted, predicted_properties = image_io.read_segmentation(prediction, rw)
    expected, expected_properties = image_io.read_segmentation(reference, rw)
    assert predicted.shape == expected.shape, (reference.name, predicted.shape, expected.shape)
    assert np.allclose(predicted_properties["spacing"], expected_properties["spacing"]), reference.name
    values = set(np.unique(predicted).tolist())
    assert values <= label_values, f"{prediction.name}: labels {values - label_values} not in {sorted(label_values)}"


@dataclass(frozen=True)
class PipelineResult:
    trainer: str
    model_folder: Path
    fold_folder: Path
    predictions: Path
    summary: dict | None  # nnUNetv2_evaluate_folder's summary.json; None when not evaluated
    train_output: str


def run_stock_pipeline(root: NnUNetRoot, trainer: str, configuration: str = "3d_fullres",
                       plans: str = "nnUNetPlans", fold: int = 0, epochs: int = 1, iterations: int = 2,
                       extra_train_args: Sequence[str] = (), extra_env: dict | None = None,
                       default_inference: bool = False, evaluate: bool = True) -> PipelineResult:
    """plan+preprocess (cached), train, predict imagesTs, evaluate against labelsTs: all stock CLI.

    ``evaluate=False`` skips ``nnUNetv2_evaluate_folder`` (``summary`` is then None): nnU-Net's
    evaluator reads only the written label files, which ``check_pipeline_outputs`` checks anyway.

    The prediction runs in one process without mirroring (``-npp 0 -nps 0 --disable_tta``) unless
    ``default_inference``: nnU-Net's worker processes each import torch and nnU-Net, and mirroring
    runs the network 8 times per window, together about 10 s of a 2-core CPU per call. Training's
    final validation still predicts with mirroring and nnU-Net's export worker.
    """
    plan_and_preprocess(root, configuration, plans)
    env = root.env(epochs=epochs, iterations=iterations, **(extra_env or {}))
    train = run_stock(["nnUNetv2_train", root.dataset_id, configuration, fold, "-tr", trainer, "-p", plans,
                       "-device", "cpu", *extra_train_args], env)
    model_folder = root.results / root.dataset_name / f"{trainer}__{plans}__{configuration}"
    predictions = root.path / "predictions" / f"{trainer}__{plans}__{configuration}"
    run_stock(["nnUNetv2_predict", "-i", root.dataset_raw / "imagesTs", "-o", predictions, "-d", root.dataset_id,
               "-c", configuration, "-f", fold, "-tr", trainer, "-p", plans, "-device", "cpu",
               *_inference_options(default_inference), "--disable_progress_bar"], env)
    summary = None
    if evaluate:
        run_stock(["nnUNetv2_evaluate_folder", root.dataset_raw / "labelsTs", predictions,
                   "-djfile", model_folder / "dataset.json", "-pfile", model_folder / "plans.json", "-np", 1], env)
        summary = json.loads((predictions / "summary.json").read_text())
    return PipelineResult(trainer, model_folder, model_folder / f"fold_{fold}", predictions, summary,
                          train.stdout + train.stderr)


CHECKPOINT_KEYS = {"network_weights", "optimizer_state", "current_epoch", "init_args", "trainer_name",
                   "inference_allowed_mirroring_axes", "logging"}


def check_pipeline_outputs(root: NnUNetRoot, result: PipelineResult, epochs: int = 1) -> None:
    """Assert on what the stock commands wrote: checkpoint, validation, predictions, summary."""
    import numpy as np
    import torch

    checkpoint = torch.load(result.fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    missing = CHECKPOINT_KEYS - set(checkpoint)
    assert not missing, f"checkpoint lacks {missing}"
    assert checkpoint["trainer_name"] == result.trainer
    assert checkpoint["current_epoch"] == epochs, checkpoint["current_epoch"]
    assert (result.fold_folder / "validation" / "summary.json").is_file(), "nnU-Net's final validation missing"
    assert (result.fold_folder / "progress.png").is_file()

    dataset_json = json.loads((root.dataset_raw / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    labels = dataset_json["labels"]
    has_regions = any(isinstance(v, (list, tuple)) for v in labels.values())
    # region-based datasets: predictions carry the values of regions_class_order (nnU-Net's export)
    label_values = {0, *dataset_json["regions_class_order"]} if has_regions else set(labels.values())
    references = sorted((root.dataset_raw / "labelsTs").glob(f"*{ending}"))
    assert references, "no test labels in the harness dataset"
    for reference in references:
        check_prediction(result.predictions / reference.name, reference, dataset_json, label_values)

    if result.summary is None:
        return
    per_case = result.summary["metric_per_case"]
    assert len(per_case) == len(references)
    if has_regions:
        n_regions = sum(1 for name, value in labels.items() if value not in (0, [0]))
        assert len(result.summary["mean"]) == n_regions, result.summary["mean"].keys()
    else:
        foreground = {str(v) for v in label_values if v != 0}
        assert foreground <= set(map(str, result.summary["mean"])), result.summary["mean"].keys()
    for metrics in result.summary["mean"].values():
        assert 0.0 <= metrics["Dice"] <= 1.0 or np.isnan(metrics["Dice"])
