"""The demo pipeline: the stock nnU-Net steps on the built-in synthetic dataset.

Plan + preprocess, train fold 0, predict the held-out cases, evaluate with nnU-Net's evaluator,
then a Dice table and a figure. Every step calls nnU-Net's own Python entry points (the same
functions ``nnUNetv2_*`` call), in this process, with the nnU-Net folder variables pointed at the
demo's work folder, so the user's own nnU-Net folders are never touched.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from nnunet_ext import atomic_io, compat
from nnunet_ext._startup import EXT_TRAINER_VARIABLE, search_path_with_discovery_folder
from nnunet_ext.errors import UserFacingError

DEMO_MARKER = ".nnunet_ext_demo"
DEMO_DATASET_ID = 990
DEMO_DATASET_NAME = "DemoAbdomen"
DEMO_CONFIGURATION = "3d_fullres"
DEFAULT_TRAINER = "nnUNetExtTrainer"


@dataclass(frozen=True)
class DemoSettings:
    trainer: str = DEFAULT_TRAINER
    epochs: int = 30
    iterations: int = 25
    validation_iterations: int = 2
    workdir: Path | None = None
    num_training: int = 10
    num_test: int = 3
    shape: tuple[int, int, int] = (16, 48, 48)  # small enough for a few hundred CPU iterations in minutes
    seed: int = 0
    num_unlabeled: int = 10  # imagesUnlabeled cases, written only for trainers with uses_unlabeled_data


@dataclass(frozen=True)
class DemoResult:
    workdir: Path
    dice_per_class: dict[str, float]
    summary_json: Path
    figure: Path
    progress_png: Path
    predictions: Path


def prepare_workdir(workdir: Path | None) -> Path:
    """A fresh temporary folder, or the user's: empty, missing, or a previous demo (never cleaned)."""
    if workdir is None:
        path = Path(tempfile.mkdtemp(prefix="nnunet_ext_demo_"))
    else:
        path = Path(workdir).expanduser().resolve()
        if path.exists() and not path.is_dir():
            raise UserFacingError(f"--workdir {path} is a file. Give a new or empty folder.")
        if path.is_dir() and any(path.iterdir()) and not (path / DEMO_MARKER).is_file():
            raise UserFacingError(
                f"--workdir {path} is not empty and was not made by 'nnunet-ext demo'. Nothing was changed. "
                f"Give a new or empty folder (or leave out --workdir to use a temporary one).")
        path.mkdir(parents=True, exist_ok=True)
    atomic_io.write_text(path / DEMO_MARKER, "This folder was made by 'nnunet-ext demo' and may be reused by it.\n")
    return path


@contextmanager
def demo_environment(workdir: Path, settings: DemoSettings) -> Iterator[dict[str, str]]:
    """Point nnU-Net at the work folder and set the short-run schedule; restore everything after."""
    values = {
        "nnUNet_raw": str(workdir / "nnUNet_raw"),
        "nnUNet_preprocessed": str(workdir / "nnUNet_preprocessed"),
        "nnUNet_results": str(workdir / "nnUNet_results"),
        EXT_TRAINER_VARIABLE: search_path_with_discovery_folder(os.environ.get(EXT_TRAINER_VARIABLE)),
        "NNUNET_EXT_NUM_EPOCHS": str(settings.epochs),
        "NNUNET_EXT_ITERS_PER_EPOCH": str(settings.iterations),
        "NNUNET_EXT_VAL_ITERS": str(settings.validation_iterations),
    }
    if "nnUNet_n_proc_DA" not in os.environ and pick_device().type == "cpu":
        # one augmentation worker: on a small CPU more workers only fight the training for cores
        # (0, nnU-Net's "no workers", breaks its planner's torch.set_num_threads call)
        values["nnUNet_n_proc_DA"] = "1"
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        Path(values[key]).mkdir(parents=True, exist_ok=True)
    try:
        yield values
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def pick_device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class StepPrinter:
    """Numbered step headers with elapsed time, so long steps never run silently."""

    def __init__(self, total: int):
        self.total, self.index, self.start = total, 0, time.perf_counter()

    def __call__(self, text: str) -> None:
        self.index += 1
        print(f"\n=== [{self.index}/{self.total}] {text}  (t = {time.perf_counter() - self.start:.0f} s) ===",
              flush=True)


def planner_for(device):
    """nnU-Net's default planner on a GPU; on a CPU our narrow CPUDemoPlanner (same rules, 1/4 width)."""
    if device.type == "cuda":
        return compat.nnunet_planner_class("ExperimentPlanner")
    from nnunet_ext.plans.cpu_demo import CPUDemoPlanner

    return CPUDemoPlanner


def check_trainer_name(name: str) -> None:
    import contextlib
    import io

    from nnunet_ext.registry import trainer_paths, unknown_name_message

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            compat.find_trainer_class(name)
    except RuntimeError:
        raise UserFacingError(unknown_name_message("trainer", name, list(trainer_paths()))) from None


def trainer_uses_unlabeled_data(name: str) -> bool:
    """True for semi-supervised trainers (class attribute ``uses_unlabeled_data``, e.g. subclasses of
    ``nnUNetSemiSupervisedTrainer``): the demo then adds imagesUnlabeled and preprocesses it."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return bool(getattr(compat.find_trainer_class(name), "uses_unlabeled_data", False))


def run_demo(settings: DemoSettings) -> DemoResult:
    from nnunet_ext.datasets.figures import save_prediction_figure
    from nnunet_ext.datasets.synthetic import SyntheticSpec, write_synthetic_dataset

    workdir = prepare_workdir(settings.workdir)
    step = StepPrinter(6)
    print(f"nnunet-ext demo: trainer {settings.trainer}, {settings.epochs} epochs x {settings.iterations} "
          f"iterations, work folder {workdir}")
    with demo_environment(workdir, settings) as env:
        check_trainer_name(settings.trainer)
        semi_supervised = trainer_uses_unlabeled_data(settings.trainer)
        device = pick_device()
        # no worker processes for nnU-Net's planning, preprocessing and evaluation: the demo's cases take
        # milliseconds each, while every worker process spends seconds importing torch and nnU-Net
        processes = 0

        from nnunet_ext.demo_universal import run_universal_demo, trainer_is_universal

        if trainer_is_universal(settings.trainer):
            step.total = 5
            dice, summary_json, figure, model, predictions = run_universal_demo(
                settings, workdir, env, step, device, planner_for(device), processes, DEMO_DATASET_ID,
                DEMO_CONFIGURATION)
            result = DemoResult(workdir, dice, summary_json, figure, model / "fold_0" / "progress.png", predictions)
            print_report(result)
            return result

        step("Writing the built-in synthetic dataset")
        spec = SyntheticSpec(num_training=settings.num_training, num_test=settings.num_test,
                             shape=settings.shape, seed=settings.seed)
        raw = write_synthetic_dataset(env["nnUNet_raw"], DEMO_DATASET_ID, DEMO_DATASET_NAME, spec)
        if semi_supervised:
            from nnunet_ext.datasets.unlabeled import write_unlabeled_images

            unlabeled = write_unlabeled_images(env["nnUNet_raw"], DEMO_DATASET_ID, DEMO_DATASET_NAME, spec,
                                               settings.num_unlabeled)
            print(f"{settings.trainer} is semi-supervised: {settings.num_unlabeled} unlabelled images in {unlabeled}")

        planner = planner_for(device)
        step(f"Planning and preprocessing (nnU-Net fingerprint, {planner.__name__}, preprocessing)")
        compat.extract_fingerprint(DEMO_DATASET_ID, processes, check_integrity=True, overwrite=True)
        plans = compat.plan_dataset(DEMO_DATASET_ID, planner)
        compat.preprocess(DEMO_DATASET_ID, plans, [DEMO_CONFIGURATION], processes)
        if semi_supervised:
            from nnunet_ext.unlabeled.preprocess import preprocess_unlabeled

            preprocess_unlabeled(DEMO_DATASET_ID, [DEMO_CONFIGURATION], plans, num_processes=1)

        step(f"Training fold 0 with {settings.trainer} on {device.type}")
        compat.train(DEMO_DATASET_ID, DEMO_CONFIGURATION, 0, settings.trainer, plans, device)
        model = compat.trained_model_folder(DEMO_DATASET_ID, settings.trainer, plans, DEMO_CONFIGURATION)

        step("Predicting the held-out test cases (nnU-Net sliding-window predictor)")
        predictions = workdir / "predictions"
        compat.predict_folder(model, raw / "imagesTs", predictions, folds=(0,), device=device, num_processes=0)

        step("Evaluating with nnU-Net's evaluator")
        summary_json = predictions / "summary.json"
        summary = compat.evaluate_folder(raw / "labelsTs", predictions, raw / "dataset.json",
                                         model / "plans.json", summary_json, num_processes=processes)
        dataset_json = json.loads((raw / "dataset.json").read_text())
        dice = dice_per_class(summary, dataset_json["labels"])

        step("Writing the figure")
        figure = save_prediction_figure(raw, predictions, dataset_json, workdir / "demo_figure.png", summary)

    result = DemoResult(workdir, dice, summary_json, figure, model / "fold_0" / "progress.png", predictions)
    print_report(result)
    return result


def dice_per_class(summary: dict, labels: dict[str, int]) -> dict[str, float]:
    """Mean Dice over test cases per foreground class, from nnU-Net's summary.json content."""
    names = {str(value): name for name, value in labels.items()}
    return {names.get(str(key), str(key)): float(metrics["Dice"])
            for key, metrics in summary["mean"].items() if str(key) in names}


def dice_table(dice: dict[str, float]) -> str:
    width = max([len(name) for name in dice] + [len("class")])
    lines = [f"{'class':<{width}}  Dice", f"{'-' * width}  ------"]
    lines += [f"{name:<{width}}  {value:.3f}" for name, value in dice.items()]
    if dice:
        lines.append(f"{'mean':<{width}}  {sum(dice.values()) / len(dice):.3f}")
    return "\n".join(lines)


def print_report(result: DemoResult) -> None:
    print("\nDice on the held-out test cases (nnU-Net evaluator, mean over cases):")
    print(dice_table(result.dice_per_class))
    print(f"\nFigure:          {result.figure}")
    print(f"Training curves: {result.progress_png}")
    print(f"Predictions:     {result.predictions}")
    print(f"Metrics:         {result.summary_json}")
    print(f"Work folder:     {result.workdir}  (nnUNet_raw / nnUNet_preprocessed / nnUNet_results inside)")
