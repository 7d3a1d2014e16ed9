"""The demo for universal (multi-dataset) trainers: merge + plan + train + predict and evaluate per task.

``nnunet-ext demo --trainer UniSegTrainer`` (or any subclass of ``nnUNetUniversalTrainer``) writes
the synthetic partially labelled family (liver+kidney with 1 channel, liver+spleen+lesion with 2,
kidney+spleen with 4), merges it with the merge tool, plans and preprocesses the merged dataset
with nnU-Net, trains fold 0, then predicts each source dataset's held-out cases as its task
(``nnunet-ext predict --task``'s code path) and evaluates them against that dataset's own labels.

:mod:`nnunet_ext.demo` calls it (with its dataset id and configuration); nothing here imports that module.
"""
from __future__ import annotations

import json

from nnunet_ext import compat

DEMO_SOURCE_IDS = (991, 992, 993)
DEMO_MERGED_NAME = "DemoUniversal"


def run_universal_demo(settings, workdir, env, step, device, planner, processes: int, dataset_id: int,
                       configuration: str):
    """The universal demo's steps into ``workdir`` (merged dataset ``dataset_id``, ``configuration``); returns
    the Dice per task and label, the first task's summary.json, the figure, the model folder and the
    predictions folder."""
    from nnunet_ext.datasets.figures import save_prediction_figure
    from nnunet_ext.datasets.multi_dataset import write_multi_dataset
    from nnunet_ext.datasets.synthetic import SyntheticSpec
    from nnunet_ext.tasks.merge import merge_datasets
    from nnunet_ext.tasks.predict import predict_task
    from nnunet_ext.tasks.task_map import TaskMap

    step("Writing three partially labelled synthetic datasets and merging them (nnunet-ext merge)")
    spec = SyntheticSpec(num_training=settings.num_training, num_test=settings.num_test, shape=settings.shape,
                         seed=settings.seed)
    sources = write_multi_dataset(env["nnUNet_raw"], DEMO_SOURCE_IDS, spec)
    merged = merge_datasets(env["nnUNet_raw"], list(DEMO_SOURCE_IDS), dataset_id, DEMO_MERGED_NAME)
    task_map = TaskMap.from_dataset_json(merged.folder / "dataset.json")
    print(f"Merged {len(task_map)} tasks into {merged.folder}: {', '.join(task_map.names)}")

    step(f"Planning and preprocessing the merged dataset ({planner.__name__})")
    compat.extract_fingerprint(dataset_id, processes, check_integrity=True, overwrite=True)
    plans = compat.plan_dataset(dataset_id, planner)
    compat.preprocess(dataset_id, plans, [configuration], processes)

    step(f"Training fold 0 with {settings.trainer} on {device.type}")
    compat.train(dataset_id, configuration, 0, settings.trainer, plans, device)
    model = compat.trained_model_folder(dataset_id, settings.trainer, plans, configuration)

    step("Predicting each source dataset's test cases as its task (nnunet-ext predict --task)")
    dice, summaries, first = {}, {}, None
    for source, task in zip(sources, task_map):
        predictions = workdir / "predictions" / task.name
        predict_task(model, source / "imagesTs", predictions, task.name, folds=(0,), device=device,
                     num_processes_preprocessing=0, num_processes_export=0)  # in this process
        summary_json = predictions / "summary.json"
        summary = compat.evaluate_folder(source / "labelsTs", predictions, predictions / "dataset.json",
                                         model / "plans.json", summary_json, num_processes=processes)
        names = {str(v): n for n, v in task.source_labels.items()}
        for key, metrics in summary["mean"].items():
            if key in names and names[key] != "background":
                dice[f"{task.name}: {names[key]}"] = float(metrics["Dice"])
        summaries[task.name] = summary_json
        first = first or (source, predictions, summary)

    step("Writing the figure (first task)")
    assert first is not None, "the merged dataset has no task"
    source, predictions, summary = first
    dataset_json = json.loads((source / "dataset.json").read_text())
    figure = save_prediction_figure(source, predictions, dataset_json, workdir / "demo_figure.png", summary)
    return dice, summaries[task_map.names[0]], figure, model, workdir / "predictions"


def trainer_is_universal(name: str) -> bool:
    """True for trainers that train on a merged multi-task dataset (``uses_merged_dataset``)."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return bool(getattr(compat.find_trainer_class(name), "uses_merged_dataset", False))


__all__ = ["run_universal_demo", "trainer_is_universal", "DEMO_SOURCE_IDS"]
