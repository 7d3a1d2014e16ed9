"""TaskMap: the reader of a merged dataset.json's ``tasks`` section (nnunet_ext.tasks.task_map)."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from nnunet_ext.errors import UserFacingError
from nnunet_ext.tasks import TaskMap, TaskMapError

# Two tasks sharing "liver"; task B has a lesion and an ignore label; values deliberately not in
# source order so the mapping back is not the identity.
TASKS = {
    "A": {"task_id": 0, "source": "Dataset003_A", "case_prefix": "T00A_", "num_channels": 1,
          "channel_names": {"0": "CT"},
          "labels": {"background": 0, "liver": 1, "kidney": 2},
          "to_source": {"0": 0, "1": 2, "2": 1},
          "source_labels": {"background": 0, "kidney": 1, "liver": 2}},
    "B": {"task_id": 1, "source": "Dataset007_B", "case_prefix": "T01B_", "num_channels": 2,
          "channel_names": {"0": "T1", "1": "T2"},
          "labels": {"background": 0, "liver": 1, "lesion": 3, "ignore": 4},
          "to_source": {"0": 0, "1": 1, "3": 2, "4": 3},
          "source_labels": {"background": 0, "liver": 1, "lesion": 2, "ignore": 3}},
}
DATASET_JSON = {"labels": {"background": 0, "liver": 1, "kidney": 2, "lesion": 3, "ignore": 4},
                "channel_names": {"0": "zscore", "1": "zscore"}, "numTraining": 4, "file_ending": ".nii.gz",
                "tasks": TASKS}


@pytest.fixture
def task_map() -> TaskMap:
    return TaskMap.from_dataset_json(DATASET_JSON)


def test_round_trip_through_json_keeps_everything(task_map: TaskMap) -> None:
    as_dict = task_map.to_dict()
    assert as_dict == TASKS  # the checkpoint form is the dataset.json form
    again = TaskMap.from_dict(json.loads(json.dumps(as_dict)))
    assert again == task_map and again.to_dict() == TASKS


def test_reads_a_dataset_json_file(tmp_path) -> None:
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(DATASET_JSON))
    assert TaskMap.from_dataset_json(path).names == ("A", "B")
    assert TaskMap.from_dataset_json(str(path)).names == ("A", "B")


def test_task_order_follows_task_id_not_dict_order() -> None:
    reordered = {"B": TASKS["B"], "A": TASKS["A"]}
    task_map = TaskMap.from_dict(reordered)
    assert task_map.names == ("A", "B")
    assert [t.task_id for t in task_map] == [0, 1]
    assert task_map.task(1).name == "B" and task_map["A"].task_id == 0 and task_map.task_id("B") == 1
    assert "A" in task_map and "C" not in task_map and len(task_map) == 2


def test_unknown_task_raises_key_error_listing_the_tasks(task_map: TaskMap) -> None:
    with pytest.raises(KeyError, match="'A'"):
        task_map.task("C")
    with pytest.raises(KeyError):
        task_map.task(2)


def test_case_lookup_by_prefix(task_map: TaskMap) -> None:
    assert task_map.task_of_case("T00A_case_001").name == "A"
    assert task_map.task_of_case("T01B_T00A_x").name == "B"  # only the start of the name counts
    task, original = task_map.source_case("T01B_patient7")
    assert (task.name, original) == ("B", "patient7")
    with pytest.raises(KeyError, match="T02C_x"):
        task_map.task_of_case("T02C_x")


def test_label_views(task_map: TaskMap) -> None:
    assert task_map.labels == DATASET_JSON["labels"]
    assert task_map.num_classes == 4  # background, liver, kidney, lesion; ignore is not a class
    assert task_map.ignore_value == 4
    assert task_map["A"].annotated_values == (1, 2)
    assert task_map["B"].annotated_values == (1, 3)  # ignore is not "annotated"
    assert task_map["A"].ignore_value is None and task_map["B"].ignore_value == 4
    assert task_map.annotated_mask("A") == (True, True, True, False)
    assert task_map.annotated_mask(1) == (True, True, False, True)
    assert task_map.max_channels == 2 and task_map["A"].num_channels == 1


def test_export_to_source_values(task_map: TaskMap) -> None:
    merged = np.array([[0, 1, 2], [3, 1, 0]])
    # task A: liver (merged 1) is 2 in its source, kidney (merged 2) is 1; lesion (3) is not A's -> 0
    np.testing.assert_array_equal(task_map.to_source("A", merged), [[0, 2, 1], [0, 2, 0]])
    np.testing.assert_array_equal(task_map.to_source("B", merged), [[0, 1, 0], [2, 1, 0]])
    np.testing.assert_array_equal(task_map.to_source_lut("B"), [0, 1, 0, 2, 3])
    with pytest.raises(ValueError, match="outside"):
        task_map.to_source("A", np.array([5]))


def _broken(mutate) -> dict:
    tasks = copy.deepcopy(TASKS)
    mutate(tasks)
    return tasks


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda t: t["B"].update(task_id=2), "0..1"),
    (lambda t: t["B"].update(case_prefix="T00A_B"), "prefix"),
    (lambda t: t["B"]["labels"].update(liver=5), "liver"),
    (lambda t: t["B"]["labels"].update(kidney=3), "contradicts"),
    (lambda t: t["A"]["to_source"].pop("2"), "to_source"),
    (lambda t: t["A"].pop("case_prefix"), "case_prefix"),
    (lambda t: t["A"].update(num_channels=0), "num_channels"),
    (lambda t: t["A"].update(labels="liver"), "malformed"),
])
def test_inconsistent_sections_are_refused(mutate, match: str) -> None:
    with pytest.raises(TaskMapError, match=match):
        TaskMap.from_dict(_broken(mutate))


def test_plain_dataset_json_is_refused_with_the_fix() -> None:
    plain = {k: v for k, v in DATASET_JSON.items() if k != "tasks"}
    with pytest.raises(TaskMapError, match="nnunet-ext merge") as info:
        TaskMap.from_dataset_json(plain)
    assert isinstance(info.value, UserFacingError) and isinstance(info.value, ValueError)
    with pytest.raises(TaskMapError, match="empty"):
        TaskMap.from_dict({})


def test_tasks_disagreeing_with_the_dataset_labels_are_refused() -> None:
    other = dict(DATASET_JSON, labels={"background": 0, "liver": 2, "kidney": 1, "lesion": 3, "ignore": 4})
    with pytest.raises(TaskMapError, match="disagree"):
        TaskMap.from_dataset_json(other)
