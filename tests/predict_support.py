"""Random-weight model folders of the universal trainers, shared by the prediction tests.

Built from the merged synthetic family's plans (the session's ``universal_root``; the U-Net's widths cut
to 4, 8, 16, ... features so that a CPU predicts a case in a fraction of a second), two folds of
different seeds, as ``nnUNetv2_train`` leaves a model folder: equality of outputs does not depend on
training, and the routes (the trainer named in the checkpoint builds the network from the model's
plans, nnU-Net's predictor loads the folds) are the real ones. Each trainer's folder is built once per
test session.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from nnunet_ext.tasks.task_map import TaskMap

_MODELS: dict[str, Path] = {}


def random_weight_model(root, trainer_name: str, base: Path) -> Path:
    """A model folder of ``trainer_name`` on ``root``'s merged dataset (plans, dataset.json, fold_0 and
    fold_1 ``checkpoint_final.pth`` of random weights, seeds 0 and 1), under ``base`` the first time."""
    if trainer_name in _MODELS:
        return _MODELS[trainer_name]
    from nnunet_ext import compat
    from nnunet_ext.trainers.dodnet import DODNET_PLANS_KEY
    from nnunet_ext.trainers.universal import TASKS_PLANS_KEY

    dataset_json = json.loads((root.dataset_raw / "dataset.json").read_text())
    task_map = TaskMap.from_dataset_json(dataset_json)
    plans = json.loads((root.preprocessed / root.dataset_name / "nnUNetPlans.json").read_text())
    plans = {**plans, TASKS_PLANS_KEY: task_map.to_dict(), DODNET_PLANS_KEY: {"nested_labels": {}}}
    arch_kwargs = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch_kwargs["features_per_stage"] = [4 * 2 ** stage for stage in range(arch_kwargs["n_stages"])]  # CPU-cheap
    plans_manager, configuration = compat.plans_and_configuration(plans, "3d_fullres")
    trainer = compat.find_trainer_class(trainer_name)
    folder = base / f"{trainer_name}__nnUNetPlans__3d_fullres"
    for fold in (0, 1):
        torch.manual_seed(fold)
        network = trainer.build_network_architecture(plans_manager, configuration, task_map.max_channels,
                                                     task_map.num_classes, False)
        (folder / f"fold_{fold}").mkdir(parents=True)
        torch.save({"network_weights": network.state_dict(), "trainer_name": trainer_name,
                    "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": (0, 1, 2)},
                   folder / f"fold_{fold}" / "checkpoint_final.pth")
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    _MODELS[trainer_name] = folder
    return folder


def outputs(folder: Path) -> dict[str, bytes]:
    """A prediction folder's files (in subfolders too) except the recorded arguments, which name the folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "predict_from_raw_data_args.json"}
