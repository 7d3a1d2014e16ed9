"""Time of one checkpoint save: ours (one atomic write with the method state) vs nnU-Net's own, one run.

Measured on one trainer (nnUNetExtTrainer with a method state, as MC-Net+'s ``training_iteration``),
built from the plans of the synthetic dataset: its network, and SGD momentum buffers made by one
optimiser step, so the checkpoint has the size it has during training. Variants, each saving over
its own previous file (as ``checkpoint_latest.pth`` is saved every 50 epochs):

* ``nnunet``: ``nnUNetTrainer.save_checkpoint`` (``torch.save`` in place; no fsync);
* ``ours``: ``nnUNetExtTrainer.save_checkpoint`` (dict + ``nnunet_ext_state``, temporary file,
  fsync of file and folder, ``os.replace``);
* ``ours_no_fsync``: the same write without the two fsyncs (``write_checkpoint(durable=False)``),
  so that ``ours - ours_no_fsync`` is the cost of durability and ``ours_no_fsync / nnunet`` the
  cost of the rest (dict, method state, temporary file, rename).

Repetitions are interleaved (one save of each variant per round, the order rotating every round)
and the median per variant is reported; before every timed save, ``os.sync()`` (not timed) writes
back what the previous save left in the page cache, so no variant pays for another's writeback.

Networks: ``default`` is nnU-Net's plans network for the synthetic dataset (4-stage PlainConvUNet);
``large`` is the 6-stage 32..320 PlainConvUNet that nnU-Net plans for typical 3D CT (about 31 M
parameters; only built and saved, never run).

Usage: ``python benchmarks/checkpoint_save.py [--networks default large] [--rounds 15]
[--folder DIR]`` (``--folder``: where the checkpoints are written; default: beside the temporary
nnU-Net root, i.e. the system's temporary folder). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

LARGE_ARCHITECTURE = {  # nnU-Net's usual 3d_fullres network (e.g. its plans for KiTS/AMOS-sized CT)
    "n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320],
    "kernel_sizes": [[3, 3, 3]] * 6, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
    "n_conv_per_stage": [2] * 6, "n_conv_per_stage_decoder": [2] * 5,
}


def _trainer_class():
    from nnunet_ext.trainers.base import nnUNetExtTrainer

    class CheckpointBenchmarkTrainer(nnUNetExtTrainer):
        """nnUNetExtTrainer plus a method state of the size of MC-Net+'s (one counter)."""

        def method_state(self) -> dict:
            return {"training_iteration": 12345}

    return CheckpointBenchmarkTrainer


def _trainer(root, network: str):
    """The trainer after ``initialize`` and one optimiser step with zero gradients (momentum buffers)."""
    import torch

    from nnunet_ext import compat

    folder = root.preprocessed / root.dataset_name
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    if network == "large":
        configuration = plans["configurations"]["3d_fullres"]
        configuration["architecture"]["arch_kwargs"].update(LARGE_ARCHITECTURE)
        configuration["patch_size"] = [128, 128, 128]
    dataset_json = json.loads((folder / "dataset.json").read_text())
    trainer = compat.instantiate_trainer(_trainer_class(), plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    trainer.initialize()
    for parameter in trainer.network.parameters():
        parameter.grad = torch.zeros_like(parameter)
    trainer.optimizer.step()
    return trainer


def _savers(trainer):
    from nnunet_ext import compat
    from nnunet_ext.trainers.base import METHOD_STATE_KEY

    def ours_no_fsync(path: str) -> None:
        checkpoint = compat.nnunet_checkpoint(trainer)
        checkpoint[METHOD_STATE_KEY] = trainer.method_state()
        compat.write_checkpoint(checkpoint, path, durable=False)

    return {"nnunet": lambda path: compat.base_trainer_class().save_checkpoint(trainer, path),
            "ours": trainer.save_checkpoint, "ours_no_fsync": ours_no_fsync}


def measure(trainer, folder: Path, rounds: int) -> dict:
    """Median seconds per save of every variant, interleaved (see the module docstring)."""
    savers = _savers(trainer)
    names = list(savers)
    times = {name: [] for name in names}
    for round_index in range(rounds + 1):  # round 0 is warm-up
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            path = str(folder / f"{name}.pth")
            os.sync()
            start = time.perf_counter()
            savers[name](path)
            seconds = time.perf_counter() - start
            if round_index:
                times[name].append(seconds)
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "parameters": sum(p.numel() for p in trainer.network.parameters()),
        "checkpoint_mb": round(os.path.getsize(folder / "ours.pth") / 1e6, 1),
        "median_s": {name: round(value, 4) for name, value in median.items()},
        "ratio_ours_vs_nnunet": round(median["ours"] / median["nnunet"], 3),
        "ratio_ours_no_fsync_vs_nnunet": round(median["ours_no_fsync"] / median["nnunet"], 3),
        "fsync_s": round(median["ours"] - median["ours_no_fsync"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="+", choices=["default", "large"], default=["default", "large"])
    parser.add_argument("--rounds", type=int, default=15, help="timed saves per variant (after one warm-up round)")
    parser.add_argument("--folder", type=Path, default=None, help="where the checkpoints are written")
    args = parser.parse_args()

    from nnunet_ext.testing.harness import make_nnunet_root, plan_and_preprocess

    with tempfile.TemporaryDirectory() as scratch:
        root = make_nnunet_root(Path(scratch) / "root")
        for name, value in root.env().items():
            if name.startswith(("nnUNet", "NNUNET_EXT", "OMP")):
                os.environ[name] = value
        plan_and_preprocess(root)
        folder = args.folder or Path(scratch) / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        results = {}
        for network in args.networks:
            with contextlib.redirect_stdout(io.StringIO()):  # the trainer's log; keep the JSON line alone
                trainer = _trainer(root, network)
            results[network] = measure(trainer, folder, args.rounds)
            del trainer
        for name in ("nnunet", "ours", "ours_no_fsync"):
            Path(folder, f"{name}.pth").unlink(missing_ok=True)
    print(json.dumps({"benchmark": "checkpoint_save", "rounds": args.rounds, "goal_ratio": 1.05,
                      "folder_filesystem_note": "fsync cost depends on the disk; the ratio without fsync does not",
                      "results": results}))


if __name__ == "__main__":
    main()
