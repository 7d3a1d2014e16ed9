"""The README's MOTS recipe (DoDNet paper setting) on tiny stand-ins of the seven source datasets:
the merge with `--separate-label cancer` and the nested labels give every task the paper's
[organ incl. tumour, tumour] channels (one channel for the tumour-only and organ-only tasks)."""
from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk

from nnunet_ext.architectures.dodnet import SigmoidLabelCoding
from nnunet_ext.cli.main import main
from nnunet_ext.tasks.task_map import TaskMap
from nnunet_ext.trainers.dodnet import parse_nested

# (dataset id, name, labels) as nnU-Net's MSD converter and a plain KiTS19 conversion write them
MOTS_SOURCES = [
    (3, "Liver", {"background": 0, "liver": 1, "cancer": 2}),
    (40, "KiTS19", {"background": 0, "kidney": 1, "tumor": 2}),
    (8, "HepaticVessel", {"background": 0, "Vessel": 1, "Tumour": 2}),
    (7, "Pancreas", {"background": 0, "pancreas": 1, "cancer": 2}),
    (10, "Colon", {"background": 0, "colon cancer primaries": 1}),
    (6, "Lung", {"background": 0, "cancer": 1}),
    (9, "Spleen", {"background": 0, "spleen": 1}),
]
README_NESTED = "Liver_cancer:liver,tumor:kidney,Tumour:Vessel,Pancreas_cancer:pancreas"


def write_stand_in(raw, dataset_id: int, name: str, labels: dict) -> None:
    folder = raw / f"Dataset{dataset_id:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for case in range(2):
        label = np.zeros((8, 12, 12), dtype=np.uint8)
        for value in range(1, len(labels)):
            label[2:6, 2 + 3 * (value - 1):4 + 3 * (value - 1), 3:9] = value
        for array, path in [(np.random.default_rng(case).normal(size=label.shape).astype(np.float32),
                             folder / "imagesTr" / f"{name.lower()}_{case:03d}_0000.nii.gz"),
                            (label, folder / "labelsTr" / f"{name.lower()}_{case:03d}.nii.gz")]:
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((0.8, 0.8, 2.5))
            sitk.WriteImage(image, str(path))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels,
                                                     "numTraining": 2, "file_ending": ".nii.gz"}))


def test_readme_mots_merge_gives_the_papers_channels(tmp_path, monkeypatch):
    raw = tmp_path / "nnUNet_raw"
    for dataset_id, name, labels in MOTS_SOURCES:
        write_stand_in(raw, dataset_id, name, labels)
    monkeypatch.setenv("nnUNet_raw", str(raw))
    ids = ["3", "40", "8", "7", "10", "6", "9"]  # the README's order
    assert main(["merge", "-d", *ids, "-o", "600", "--name", "MOTS", "--separate-label", "cancer"]) == 0
    task_map = TaskMap.from_dataset_json(raw / "Dataset600_MOTS" / "dataset.json")
    assert task_map.names == ("Liver", "KiTS19", "HepaticVessel", "Pancreas", "Colon", "Lung", "Spleen")
    assert {"Liver_cancer", "Pancreas_cancer", "Lung_cancer"} <= set(task_map.labels)
    coding = SigmoidLabelCoding(task_map, parse_nested(README_NESTED))
    assert coding.head_channels == 2  # the paper's head: 8 -> 8 -> 8 -> 2
    channels = {task.name: len(coding.task_classes[task.task_id]) for task in task_map}
    assert channels == {"Liver": 2, "KiTS19": 2, "HepaticVessel": 2, "Pancreas": 2, "Colon": 1, "Lung": 1,
                        "Spleen": 1}
    # [organ incl. tumour, tumour]: the organ channel's target covers the tumour
    import torch

    liver = task_map.task("Liver")
    organ, tumour = task_map.labels["liver"], task_map.labels["Liver_cancer"]
    target = torch.tensor([0, organ, tumour]).view(1, 1, 3)
    encoded, valid = coding.encode(target, torch.tensor([liver.task_id]))
    assert encoded[0].tolist() == [[0, 1, 1], [0, 0, 1]] and valid[0].tolist() == [True, True]
