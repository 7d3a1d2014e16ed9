"""All tasks in one pass vs one run per task: ``nnunet-ext predict --task all`` against K runs of
``nnunet-ext predict --task T`` (issue 20's measure), same model, same cases, one process.

Per universal network (UniSeg with the official 11 tasks and channel counts 1 x 9, 4, 2; DoDNet and
TransDoDNet with 7 MOTS-like tasks, organ + nested tumour each), with random weights:

* ``command``: wall time of :func:`nnunet_ext.tasks.all_tasks.predict_tasks` (every task) vs the sum of
  K :func:`nnunet_ext.tasks.predict.predict_task` runs (what K commands do, minus interpreter start-up):
  nnU-Net's preprocessing, sliding window, export and our label export included;
* ``sliding_window``: nnU-Net's ``predict_logits_from_preprocessed_data`` on one preprocessed case with
  the stacked network vs K times with ``set_task`` (network plus nnU-Net's Gaussian-weighted fp16
  accumulation of the logits, which on a CPU costs as much as a small network);
* ``network``: one forward pass of one window, stacked vs K single-task passes, in seconds and in
  FLOPs (PyTorch's counter: convolutions and matrix products, independent of other load): the
  compute sharing alone, the ratio that large cases approach.

Both arms of a timing are measured in alternation, best of ``--repeats`` rounds, so that other load on
a shared machine hits them alike; the command arms run once.

The model folders are real (the trainer named in the checkpoint builds the network from the plans):
plans come from nnU-Net planning a synthetic 4-channel dataset of ``--shape`` voxels (so the patch,
and UniSeg's U-Net, follow nnU-Net's rules for that size); DoDNet and TransDoDNet have the paper's
depth and widths whatever the plans. Mirroring is off by default (``--tta`` turns it on: 8x the
network compute in both arms).

Usage: ``python benchmarks/all_tasks_vs_per_task.py [--shape 32 64 64] [--cases 1] [--tta] [--repeats 3]
[--device cpu] [--networks UniSeg DoDNet TransDoDNet] [--json out.json]``. Prints a markdown table
and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

TASKS = {  # network -> (trainer, per-task channel counts)
    "UniSeg": ("UniSegTrainer", [1] * 9 + [4, 2]),
    "DoDNet": ("DoDNetTrainer", [1] * 7),
    "TransDoDNet": ("TransDoDNetTrainer", [1] * 7),
}
DATASET_ID = 981


def merged_dataset_json(channels: list[int]) -> dict:
    """A merged dataset.json of len(channels) tasks; task t annotates organ_t and tumour_t (own values)."""
    tasks, labels = {}, {"background": 0}
    for t, count in enumerate(channels):
        organ, tumour = 2 * t + 1, 2 * t + 2
        labels.update({f"organ{t}": organ, f"tumour{t}": tumour})
        tasks[f"Task{t}"] = {"task_id": t, "source": f"Dataset{100 + t}_Task{t}", "case_prefix": f"T{t:02d}Task{t}_",
                             "num_channels": count, "channel_names": {str(c): "zscore" for c in range(count)},
                             "labels": {"background": 0, f"organ{t}": organ, f"tumour{t}": tumour},
                             "to_source": {"0": 0, str(organ): 1, str(tumour): 2},
                             "source_labels": {"background": 0, "organ": 1, "tumour": 2}}
    return {"channel_names": {str(c): "zscore" for c in range(max(channels))}, "labels": labels,
            "numTraining": 0, "file_ending": ".nii.gz", "tasks": tasks}


def model_folder(base: Path, plans: dict, trainer_name: str, channels: list[int]) -> Path:
    from nnunet_ext import compat
    from nnunet_ext.atomic_io import write_json
    from nnunet_ext.tasks.task_map import TaskMap
    from nnunet_ext.trainers.dodnet import DODNET_PLANS_KEY
    from nnunet_ext.trainers.universal import TASKS_PLANS_KEY

    dataset_json = merged_dataset_json(channels)
    task_map = TaskMap.from_dataset_json(dataset_json)
    nested = {f"tumour{t}": f"organ{t}" for t in range(len(channels))}  # MOTS: [organ incl. tumour, tumour]
    plans = {**plans, TASKS_PLANS_KEY: task_map.to_dict(), DODNET_PLANS_KEY: {"nested_labels": nested}}
    plans_manager, configuration = compat.plans_and_configuration(plans, "3d_fullres")
    network = compat.find_trainer_class(trainer_name).build_network_architecture(
        plans_manager, configuration, task_map.max_channels, task_map.num_classes, False)
    folder = base / f"{trainer_name}__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    compat.write_checkpoint({"network_weights": network.state_dict(), "trainer_name": trainer_name,
                             "init_args": {"configuration": "3d_fullres"},
                             "inference_allowed_mirroring_axes": (0, 1, 2)},
                            folder / "fold_0" / "checkpoint_final.pth")
    write_json(folder / "plans.json", plans)
    write_json(folder / "dataset.json", dataset_json)
    return folder


def input_folder(raw_dataset: Path, target: Path, channels: int) -> Path:
    target.mkdir(parents=True)
    for image in sorted((raw_dataset / "imagesTs").glob("*.nii.gz")):
        if int(image.name[-len("0000.nii.gz"):-len(".nii.gz")]) < channels:
            os.link(image, target / image.name)
    return target


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def interleaved(all_tasks, per_task: list, repeats: int) -> tuple[float, float]:
    """(all tasks, sum over tasks) seconds: best of ``repeats`` rounds, each round timing both arms, so
    that load from other processes on a shared machine hits both alike."""
    best_all, best_each = float("inf"), [float("inf")] * len(per_task)
    for _ in range(repeats):
        best_all = min(best_all, timed(all_tasks))
        best_each = [min(best, timed(function)) for best, function in zip(best_each, per_task)]
    return best_all, sum(best_each)


def flop_counter_class():
    """A FLOP counter with PyTorch's formulas (convolutions, matrix products); unlike ``FlopCounterMode`` it
    tracks no modules, which fails on TransDoDNet's attention."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class FlopCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                self.total += formula(*args, **kwargs, out_val=out)
            return out

    return FlopCounter


def window_measures(folder: Path, images: Path, task_ids: list[int], tta: bool, device,
                    repeats: int) -> dict[str, float]:
    """All tasks stacked vs the sum over tasks: seconds of nnU-Net's logits for the first case
    (``sliding_window_*``), seconds and FLOPs (PyTorch's counter) of one forward pass of one window
    (``network_*``)."""
    import torch

    from nnunet_ext import compat
    from nnunet_ext.tasks.all_tasks import AllTasksNetwork
    from nnunet_ext.tasks.predict import task_conditioned_network

    predictor = compat.predictor(0.5, tta, device)
    predictor.allow_tqdm = False
    predictor.initialize_from_trained_model_folder(os.fspath(folder), (0,))
    files = sorted(images.glob("*.nii.gz"))
    case = files[0].name[:-len("_0000.nii.gz")]
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    data, _, _ = preprocessor.run_case([os.fspath(f) for f in files if f.name.startswith(case + "_")], None,
                                       predictor.plans_manager, predictor.configuration_manager,
                                       predictor.dataset_json)
    data = torch.from_numpy(data).float()
    network = task_conditioned_network(predictor, folder)
    stacked_network = AllTasksNetwork(network, task_ids)
    FlopCounter = flop_counter_class()

    def stacked_logits():
        with compat.stacked_predictor(predictor, stacked_network, sum(stacked_network.block_channels)):
            predictor.predict_logits_from_preprocessed_data(data)

    def single_logits(task):
        network.set_task(task)
        predictor.predict_logits_from_preprocessed_data(data)

    single_logits(task_ids[0])  # warm-up
    window_all, window_each = interleaved(stacked_logits, [lambda t=t: single_logits(t) for t in task_ids], repeats)
    window = torch.randn(1, data.shape[0], *predictor.configuration_manager.patch_size, device=device)

    def single_forward(task):
        network.set_task(task)
        network(window)

    with torch.inference_mode():
        stacked_network(window)  # warm-up
        network_all, network_each = interleaved(lambda: stacked_network(window),
                                                [lambda t=t: single_forward(t) for t in task_ids], repeats)
    flops = []
    with torch.no_grad():  # (under inference_mode composite ops such as conv3d reach the counter undecomposed)
        for function in [lambda: stacked_network(window)] + [lambda t=t: single_forward(t) for t in task_ids]:
            with FlopCounter() as counter:
                function()
            flops.append(counter.total)
    return {"sliding_window_all_s": window_all, "sliding_window_per_task_s": window_each,
            "network_all_s": network_all, "network_per_task_s": network_each,
            "network_all_gflop": flops[0] / 1e9, "network_per_task_gflop": sum(flops[1:]) / 1e9}


def run(name: str, root: Path, plans: dict, raw_dataset: Path, args, device) -> dict:
    from nnunet_ext.tasks.all_tasks import predict_tasks
    from nnunet_ext.tasks.predict import predict_task
    from nnunet_ext.tasks.task_map import TaskMap

    trainer, channels = TASKS[name]
    folder = model_folder(root / name, plans, trainer, channels)
    images = input_folder(raw_dataset, root / name / "images", max(channels))
    names = list(TaskMap.from_dataset_json(folder / "dataset.json").names)
    options = dict(folds=(0,), use_mirroring=args.tta, device=device, num_processes_preprocessing=1,
                   num_processes_export=1)
    windows = window_measures(folder, images, list(range(len(names))), args.tta, device, args.repeats)
    command_all = timed(lambda: predict_tasks(folder, images, root / name / "all", ["all"], **options))
    command_each = sum(timed(lambda task=task: predict_task(folder, images, root / name / "each" / task, task,
                                                            **options))
                       for task in names)
    for task in names:  # the comparison is only fair if both wrote the same (the recorded arguments name the folder)
        for file in (root / name / "each" / task).iterdir():
            if file.name != "predict_from_raw_data_args.json":
                assert file.read_bytes() == (root / name / "all" / task / file.name).read_bytes(), (name, task, file)
    return {"network": name, "trainer": trainer, "K": len(names), "distinct_channel_counts": len(set(channels)),
            "command_all_s": round(command_all, 2), "command_per_task_s": round(command_each, 2),
            "command_ratio": round(command_each / command_all, 2),
            **{key: round(value, 2) for key, value in windows.items()},
            "sliding_window_ratio": round(windows["sliding_window_per_task_s"] / windows["sliding_window_all_s"], 2),
            "network_ratio": round(windows["network_per_task_s"] / windows["network_all_s"], 2),
            "flop_ratio": round(windows["network_per_task_gflop"] / windows["network_all_gflop"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[32, 64, 64], help="synthetic image (z y x) voxels")
    parser.add_argument("--cases", type=int, default=1, help="cases to predict")
    parser.add_argument("--tta", action="store_true", help="mirroring (nnU-Net's default; 8x the compute)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="sliding-window and network timings: best of this many rounds (commands run once)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--networks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="all_tasks_bench_"))
    os.environ.update({"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
                       "nnUNet_results": str(root / "results"), "nnUNet_compile": "false"})
    from nnunet_ext.datasets.synthetic import SyntheticSpec, dataset_folder_name, write_synthetic_dataset
    from nnunet_ext.testing.harness import NnUNetRoot, run_stock

    import torch

    try:
        spec = SyntheticSpec(num_training=2, num_test=args.cases, shape=tuple(args.shape), spacing=(1.0, 1.0, 1.0),
                             num_channels=4)
        nnunet_root = NnUNetRoot(root, DATASET_ID, dataset_folder_name(DATASET_ID, "AllTasksBench"))
        for folder in (nnunet_root.raw, nnunet_root.preprocessed, nnunet_root.results):
            folder.mkdir(parents=True)
        write_synthetic_dataset(nnunet_root.raw, DATASET_ID, "AllTasksBench", spec)
        env = nnunet_root.env()
        run_stock(["nnUNetv2_extract_fingerprint", "-d", DATASET_ID, "-np", 1], env)
        run_stock(["nnUNetv2_plan_experiment", "-d", DATASET_ID], env)
        plans = json.loads((nnunet_root.preprocessed / nnunet_root.dataset_name / "nnUNetPlans.json").read_text())
        device = torch.device(args.device)
        results = [run(name, root, plans, nnunet_root.dataset_raw, args, device) for name in args.networks]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    patch = plans["configurations"]["3d_fullres"]["patch_size"]
    print(f"\nAll tasks in one pass vs K runs ({args.device}, image {'x'.join(map(str, args.shape))}, patch "
          f"{'x'.join(map(str, patch))}, {args.cases} case(s), mirroring {'on' if args.tta else 'off'}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads)\n")
    print("| network | K | command: all / K runs (s) | ratio | sliding window: all / K (s) | ratio | "
          "one window's forward: all / K (s) | ratio | GFLOP: all / K | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['network']} | {r['K']} | {r['command_all_s']} / {r['command_per_task_s']} | "
              f"{r['command_ratio']}x | {r['sliding_window_all_s']} / {r['sliding_window_per_task_s']} | "
              f"{r['sliding_window_ratio']}x | {r['network_all_s']} / {r['network_per_task_s']} | "
              f"{r['network_ratio']}x | {r['network_all_gflop']} / {r['network_per_task_gflop']} | "
              f"{r['flop_ratio']}x |")
    summary = {"device": args.device, "shape": args.shape, "patch": patch, "cases": args.cases, "tta": args.tta,
               "results": results}
    print(json.dumps(summary))
    if args.json:
        from nnunet_ext.atomic_io import write_json

        write_json(args.json, summary)


if __name__ == "__main__":
    sys.exit(main())
