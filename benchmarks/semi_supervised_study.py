"""Semi-supervised methods against supervised training with the same labelled budget, one run.

On the synthetic dataset with ``imagesUnlabeled`` (written, planned and preprocessed with the
stock nnU-Net commands in a temporary folder), fold 0 is trained with the same schedule by:

* ``nnUNetExtTrainer`` (nnU-Net's default trainer, network and loss; it only adds the short-run
  variables that give every trainer here the same schedule; every labelled training case: the
  upper reference),
* ``SupervisedBudgetTrainer`` (nnU-Net's network and loss, only the budget's labelled cases),
* ``MCNetPlusTrainer`` and ``LeFeDTrainer`` (the budget's labelled cases + unlabelled images),

then each model predicts the held-out cases and nnU-Net's evaluator scores them. Reported per
trainer: mean Dice per class, mean foreground Dice, median epoch time (nnU-Net's log), seconds per
iteration and peak resident memory of the training process (``/usr/bin/time``). Honest numbers,
whatever they are: short CPU schedules favour no one in particular.

Usage: ``python benchmarks/semi_supervised_study.py [--budget 2] [--epochs 10] [--iters 20]``.
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import tempfile
from pathlib import Path

from nnunet_ext.datasets.synthetic import SyntheticSpec
from nnunet_ext.datasets.unlabeled import write_unlabeled_images
from nnunet_ext.testing.harness import make_nnunet_root, plan_and_preprocess, run_stock

DATASET_ID, NAME = 996, "SemiStudy"
SUPERVISED_BUDGET_TRAINER = '''
from nnunet_ext.trainers.semi_supervised import nnUNetSemiSupervisedTrainer


class SupervisedBudgetTrainer(nnUNetSemiSupervisedTrainer):
    """nnU-Net's network and loss on the label budget's cases only (no unlabelled patches)."""

    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        import torch

        super().__init__(plans, configuration, fold, dataset_json, device or torch.device("cuda"))
        self.unlabeled_batch_size = 0
'''


def train_and_score(root, trainer: str, env: dict, budget: int | None) -> dict:
    run_env = dict(env)
    if budget is not None:
        run_env["NNUNET_EXT_LABEL_BUDGET"] = str(budget)
    command = ["/usr/bin/time", "-f", "PEAK_RSS_KB=%M", "nnUNetv2_train", str(root.dataset_id), "3d_fullres", "0",
               "-tr", trainer, "-device", "cpu"]
    completed = subprocess.run(command, env=run_env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{trainer} failed:\n{(completed.stdout + completed.stderr)[-4000:]}")
    peak_kb = int(re.findall(r"PEAK_RSS_KB=(\d+)", completed.stderr)[-1])
    epoch_times = [float(t) for t in re.findall(r"Epoch time: ([\d.]+) s", completed.stdout)]
    predictions = root.path / "predictions" / trainer
    run_stock(["nnUNetv2_predict", "-i", root.dataset_raw / "imagesTs", "-o", predictions, "-d", root.dataset_id,
               "-c", "3d_fullres", "-f", 0, "-tr", trainer, "-device", "cpu", "-npp", 1, "-nps", 1,
               "--disable_progress_bar"], run_env)
    model = root.results / root.dataset_name / f"{trainer}__nnUNetPlans__3d_fullres"
    run_stock(["nnUNetv2_evaluate_folder", root.dataset_raw / "labelsTs", predictions, "-djfile",
               model / "dataset.json", "-pfile", model / "plans.json", "-np", 1], run_env)
    summary = json.loads((predictions / "summary.json").read_text())
    labels = {str(v): k for k, v in json.loads((root.dataset_raw / "dataset.json").read_text())["labels"].items()}
    median_epoch = statistics.median(epoch_times)
    return {"dice": {labels[k]: round(v["Dice"], 4) for k, v in summary["mean"].items()},
            "foreground_dice": round(summary["foreground_mean"]["Dice"], 4),
            "median_epoch_s": round(median_epoch, 2),
            "s_per_iteration": round(median_epoch / int(env["NNUNET_EXT_ITERS_PER_EPOCH"]), 3),
            "peak_rss_gb": round(peak_kb / 1024 ** 2, 2), "label_budget": budget}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget", type=int, default=2, help="labelled cases of fold 0's training split")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--unlabeled", type=int, default=8)
    parser.add_argument("--trainers", nargs="+",
                        default=["nnUNetExtTrainer", "SupervisedBudgetTrainer", "MCNetPlusTrainer", "LeFeDTrainer"])
    args = parser.parse_args()
    spec = SyntheticSpec(num_training=10, num_test=4, shape=(16, 48, 48), spacing=(2.5, 1.0, 1.0))
    with tempfile.TemporaryDirectory() as folder:
        root = make_nnunet_root(folder, DATASET_ID, NAME, spec)
        write_unlabeled_images(root.raw, DATASET_ID, NAME, spec, args.unlabeled)
        plan_and_preprocess(root)
        trainer_folder = Path(folder) / "study_trainers"
        trainer_folder.mkdir()
        (trainer_folder / "supervised_budget_trainer.py").write_text(SUPERVISED_BUDGET_TRAINER)
        env = root.env(epochs=args.epochs, iterations=args.iters, validation_iterations=2,
                       nnUNet_extTrainer=str(trainer_folder))
        run_stock(["nnunet-ext", "preprocess-unlabeled", "-d", DATASET_ID, "-c", "3d_fullres", "-np", 1], env)
        results = {}
        for trainer in args.trainers:
            budget = None if trainer == "nnUNetExtTrainer" else args.budget
            results[trainer] = train_and_score(root, trainer, env, budget)
    print(json.dumps({"benchmark": "semi_supervised_study", "device": "cpu", "epochs": args.epochs,
                      "iterations": args.iters, "unlabeled_images": args.unlabeled, "results": results}))


if __name__ == "__main__":
    main()
