"""``nnunet-ext merge`` (nnunet_ext.tasks.merge, label_space, sources): merged raw datasets from several."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext.cli.main import main
from nnunet_ext.datasets.multi_dataset import write_multi_dataset
from nnunet_ext.datasets.synthetic import SyntheticSpec
from nnunet_ext.errors import UserFacingError
from nnunet_ext.tasks import TaskMap
from nnunet_ext.tasks.label_space import LabelSpaceError, SourceLabels, build_label_space
from nnunet_ext.tasks.merge import MergeError, MergeOptions, merge_datasets, merged_channel_names
from nnunet_ext.testing.harness import run_stock
from nnunet_ext.testing.hostile import temporaries

SOURCE_IDS = (971, 972, 973)
SPEC = SyntheticSpec(num_training=3, num_test=1, shape=(16, 32, 32), spacing=(2.5, 1.0, 1.0))


def _checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Content and mtime of every file: proves a folder was not rewritten."""
    return {k: (v, (folder / k).stat().st_mtime_ns) for k, v in _checksums(folder).items()}


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _geometry(path: Path) -> tuple:
    image = sitk.ReadImage(str(path))
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """Three synthetic sources (1, 2 and 4 channels; overlapping organ sets, one with a lesion)."""
    root = tmp_path_factory.mktemp("merge") / "nnUNet_raw"
    write_multi_dataset(root, SOURCE_IDS, SPEC)
    return root


@pytest.fixture(scope="module")
def source_checksums(raw: Path) -> dict[str, dict[str, str]]:
    return {p.name: _checksums(p) for p in sorted(raw.iterdir()) if p.name.startswith("Dataset97")}


@pytest.fixture(scope="module")
def merged(raw: Path, source_checksums) -> Path:
    result = merge_datasets(raw, SOURCE_IDS, 501, "Universal")
    assert result.status == "created"
    # 4 cases (3 train + 1 test) per task with 1, 2 and 4 channels, padded to 4; 9 training labels
    assert (result.linked, result.copied, result.padded, result.labels) == (4 * (1 + 2 + 4), 0, 4 * (3 + 2), 9)
    return result.folder


def _dataset_json(folder: Path) -> dict:
    return json.loads((folder / "dataset.json").read_text())


def _sources_untouched(raw: Path, source_checksums: dict) -> None:
    for name, checksums in source_checksums.items():
        assert _checksums(raw / name) == checksums, f"{name} was modified"


# ---------------------------------------------------------------------------- content


def test_dataset_json_and_tasks_section(merged: Path) -> None:
    ds = _dataset_json(merged)
    assert ds["labels"] == {"background": 0, "liver": 1, "kidney": 2, "spleen": 3, "lesion": 4}
    assert ds["channel_names"] == {"0": "CT", "1": "zscore", "2": "zscore", "3": "zscore"}
    assert ds["numTraining"] == 9 and ds["file_ending"] == ".nii.gz"
    tasks = ds["tasks"]
    assert list(tasks) == ["SynthLiverKidney", "SynthLiverSpleenLesion", "SynthKidneySpleen"]
    assert tasks["SynthLiverKidney"] == {
        "task_id": 0, "source": "Dataset971_SynthLiverKidney", "case_prefix": "T00SynthLiverKidney_",
        "num_channels": 1, "channel_names": {"0": "CT"},
        "labels": {"background": 0, "liver": 1, "kidney": 2}, "to_source": {"0": 0, "1": 1, "2": 2},
        "source_labels": {"background": 0, "liver": 1, "kidney": 2}}
    lesion = tasks["SynthLiverSpleenLesion"]
    assert (lesion["num_channels"], lesion["labels"], lesion["to_source"]) == (
        2, {"background": 0, "liver": 1, "spleen": 3, "lesion": 4}, {"0": 0, "1": 1, "3": 2, "4": 3})
    kidney_spleen = tasks["SynthKidneySpleen"]
    assert (kidney_spleen["num_channels"], kidney_spleen["labels"], kidney_spleen["to_source"]) == (
        4, {"background": 0, "kidney": 2, "spleen": 3}, {"0": 0, "2": 1, "3": 2})
    assert kidney_spleen["channel_names"] == {str(c): "CT" for c in range(4)}
    task_map = TaskMap.from_dataset_json(merged / "dataset.json")
    assert task_map.names == tuple(tasks) and task_map.max_channels == 4


def test_cases_keep_traceable_names_in_train_and_test(raw: Path, merged: Path) -> None:
    task_map = TaskMap.from_dataset_json(merged / "dataset.json")
    labels = sorted(p.name[: -len(".nii.gz")] for p in (merged / "labelsTr").iterdir())
    expected = sorted(f"{t.case_prefix}synth_{i:03d}" for t in task_map for i in range(3))
    assert labels == expected
    tests = sorted({p.name[: -len("_0000.nii.gz")] for p in (merged / "imagesTs").iterdir()})
    assert tests == sorted(f"{t.case_prefix}synth_003" for t in task_map)
    assert not (merged / "labelsTs").exists()
    for case in labels:
        task, original = task_map.source_case(case)
        assert (raw / task.source / "labelsTr" / f"{original}.nii.gz").is_file()
    assert len(list((merged / "imagesTr").iterdir())) == 9 * 4


def test_labels_are_remapped_voxel_wise(raw: Path, merged: Path) -> None:
    task_map = TaskMap.from_dataset_json(merged / "dataset.json")
    for task in task_map:
        for i in range(3):
            source = _array(raw / task.source / "labelsTr" / f"synth_{i:03d}.nii.gz")
            target = _array(merged / "labelsTr" / f"{task.case_prefix}synth_{i:03d}.nii.gz")
            assert source.shape == target.shape
            for merged_value, source_value in task.to_source.items():
                np.testing.assert_array_equal(target == merged_value, source == source_value)
            assert set(np.unique(target).tolist()) <= {0, *task.annotated_values}
            # and back: the export for task-aware prediction restores the source labels exactly
            np.testing.assert_array_equal(task_map.to_source(task.name, target), source)
            assert _geometry(raw / task.source / "labelsTr" / f"synth_{i:03d}.nii.gz")[1:] == \
                _geometry(merged / "labelsTr" / f"{task.case_prefix}synth_{i:03d}.nii.gz")[1:]
    # kidney is 1 in SynthKidneySpleen but 2 in the merged space: the remap really happened
    source = _array(raw / "Dataset973_SynthKidneySpleen" / "labelsTr" / "synth_000.nii.gz")
    target = _array(merged / "labelsTr" / "T02SynthKidneySpleen_synth_000.nii.gz")
    assert (source == 1).sum() > 0 and np.array_equal(target == 2, source == 1)


@pytest.mark.parametrize(("task", "channels"), [("T00SynthLiverKidney_", 1), ("T01SynthLiverSpleenLesion_", 2),
                                                ("T02SynthKidneySpleen_", 4)])
def test_channels_padded_with_zero_images_of_the_case_geometry(raw: Path, merged: Path, task: str,
                                                               channels: int) -> None:
    source = next(p for p in raw.iterdir() if p.name.endswith(task[3:-1]))
    for split, case in (("imagesTr", "synth_001"), ("imagesTs", "synth_003")):
        first = source / split / f"{case}_0000.nii.gz"
        for c in range(4):
            path = merged / split / f"{task}{case}_{c:04d}.nii.gz"
            if c < channels:
                assert path.read_bytes() == (source / split / f"{case}_{c:04d}.nii.gz").read_bytes()
            else:
                assert not np.any(_array(path)), f"{path.name} should be all zeros"
                assert _geometry(path) == _geometry(first)
                assert sitk.ReadImage(str(path)).GetPixelID() == sitk.ReadImage(str(first)).GetPixelID()


def test_hard_links_by_default_and_sources_untouched(raw: Path, merged: Path, source_checksums) -> None:
    source = raw / "Dataset972_SynthLiverSpleenLesion" / "imagesTr" / "synth_002_0001.nii.gz"
    target = merged / "imagesTr" / "T01SynthLiverSpleenLesion_synth_002_0001.nii.gz"
    assert os.path.samefile(source, target)
    label = merged / "labelsTr" / "T01SynthLiverSpleenLesion_synth_002.nii.gz"
    assert os.stat(label).st_nlink == 1, "labels are always written anew, never linked"
    _sources_untouched(raw, source_checksums)


def test_copy_option_copies(raw: Path, merged: Path, source_checksums) -> None:
    result = merge_datasets(raw, SOURCE_IDS, 502, "Copied", MergeOptions(copy=True))
    assert result.linked == 0 and result.copied == 4 * (1 + 2 + 4)
    source = raw / "Dataset972_SynthLiverSpleenLesion" / "imagesTr" / "synth_002_0001.nii.gz"
    target = result.folder / "imagesTr" / "T01SynthLiverSpleenLesion_synth_002_0001.nii.gz"
    assert not os.path.samefile(source, target) and source.read_bytes() == target.read_bytes()
    # same content as the hard-linked merge, apart from the name
    assert {k: v for k, v in _checksums(result.folder).items() if k != "dataset.json"} == \
        {k: v for k, v in _checksums(merged).items() if k != "dataset.json"}
    _sources_untouched(raw, source_checksums)


def test_no_share_labels_gives_every_task_its_own_values(raw: Path) -> None:
    result = merge_datasets(raw, SOURCE_IDS, 503, "Separate", MergeOptions(share_labels=False))
    task_map = result.task_map
    assert task_map.labels == {"background": 0, "SynthLiverKidney_liver": 1, "SynthLiverKidney_kidney": 2,
                               "SynthLiverSpleenLesion_liver": 3, "SynthLiverSpleenLesion_spleen": 4,
                               "SynthLiverSpleenLesion_lesion": 5, "SynthKidneySpleen_kidney": 6,
                               "SynthKidneySpleen_spleen": 7}
    values = [set(t.annotated_values) for t in task_map]
    assert all(not (a & b) for i, a in enumerate(values) for b in values[i + 1:])
    label = _array(result.folder / "labelsTr" / "T02SynthKidneySpleen_synth_000.nii.gz")
    source = _array(raw / "Dataset973_SynthKidneySpleen" / "labelsTr" / "synth_000.nii.gz")
    np.testing.assert_array_equal(label == 6, source == 1)


def test_separate_label_and_task_names(raw: Path) -> None:
    result = merge_datasets(raw, SOURCE_IDS, 504, "Named", MergeOptions(
        task_names=("A", "B", "C"), separate_labels=("spleen",)))
    assert result.task_map.labels == {"background": 0, "liver": 1, "kidney": 2, "B_spleen": 3, "lesion": 4,
                                      "C_spleen": 5}
    assert [t.case_prefix for t in result.task_map] == ["T00A_", "T01B_", "T02C_"]
    assert (result.folder / "labelsTr" / "T02C_synth_000.nii.gz").is_file()


# ---------------------------------------------------------------------------- worker processes and progress


def test_worker_processes_write_the_same_bytes_as_one(raw: Path, merged: Path, source_checksums) -> None:
    """-np 2 (spawned workers check and write) gives the serial merge's files, byte for byte."""
    result = merge_datasets(raw, SOURCE_IDS, 530, "Universal", num_processes=2)
    assert (result.status, result.linked, result.copied, result.padded, result.labels) == \
        ("created", 4 * (1 + 2 + 4), 0, 4 * (3 + 2), 9)
    assert _checksums(result.folder) == _checksums(merged)
    assert not temporaries(raw)
    _sources_untouched(raw, source_checksums)


def test_a_bad_file_found_by_a_worker_is_refused_as_in_one_process(tmp_path: Path) -> None:
    _make_source(tmp_path, 1, "Good", {"background": 0, "liver": 1}, cases=3)
    bad = _make_source(tmp_path, 2, "Bad", {"background": 0, "liver": 1}, cases=3)
    data = (bad / "imagesTr" / "c2_0000.nii.gz").read_bytes()
    (bad / "imagesTr" / "c2_0000.nii.gz").write_bytes(data[: len(data) // 2])
    for processes in (1, 2):
        with pytest.raises(UserFacingError, match=r"Dataset002_Bad/imagesTr/c2_0000.nii.gz: image cannot be decoded"):
            merge_datasets(tmp_path, [1, 2], 900, "Out", num_processes=processes)
    assert not (tmp_path / "Dataset900_Out").exists() and not temporaries(tmp_path)


def test_ctrl_c_while_workers_write_stops_them_and_leaves_no_output(raw: Path, monkeypatch) -> None:
    import multiprocessing

    from nnunet_ext.tasks import merge as merge_module

    class InterruptedBar:
        """The progress bar, with Ctrl-C arriving at the 30th file (28 links come first, then the workers')."""

        def __init__(self, iterable=None, total=None, desc=""):  # noqa: ANN001 - tqdm's signature
            self.iterable, self.desc, self.count = iterable, desc, 0

        def __iter__(self):
            return iter(self.iterable)

        def __enter__(self) -> "InterruptedBar":
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def update(self, n: int = 1) -> None:
            self.count += n
            if self.count == 30:
                raise KeyboardInterrupt

    monkeypatch.setattr(merge_module, "progress", InterruptedBar)
    with pytest.raises(KeyboardInterrupt):
        merge_datasets(raw, SOURCE_IDS, 531, "Interrupted", num_processes=2)
    assert not (raw / "Dataset531_Interrupted").exists() and not temporaries(raw)
    assert not multiprocessing.active_children(), "worker processes outlived the interrupt"


def test_progress_bars_only_on_a_terminal(monkeypatch, capsys) -> None:
    import io
    import sys

    from nnunet_ext.parallel import imap, progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert list(imap(abs, [-1, -2, 3], 1)) == [1, 2, 3]
    with progress(total=2, desc="cases") as bar:  # pytest's captured stderr is no terminal
        assert bar.disable
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with progress(total=2, desc="cases") as bar:
        assert not bar.disable
        bar.update(2)
    assert "cases:" in terminal.getvalue() and "/2 [" in terminal.getvalue()


# ---------------------------------------------------------------------------- re-runs


def test_rerun_verifies_then_completes_missing_files(raw: Path) -> None:
    first = merge_datasets(raw, SOURCE_IDS, 505, "Rerun")
    before = _snapshot(first.folder)
    again = merge_datasets(raw, SOURCE_IDS, 505, "Rerun", MergeOptions(copy=True))
    assert again.status == "verified" and _snapshot(first.folder) == before
    removed = ["labelsTr/T01SynthLiverSpleenLesion_synth_000.nii.gz",  # a remapped label
               "imagesTr/T00SynthLiverKidney_synth_001_0002.nii.gz",  # a zero channel
               "imagesTs/T02SynthKidneySpleen_synth_003_0003.nii.gz"]  # a linked image
    for name in removed:
        (first.folder / name).unlink()
    completed = merge_datasets(raw, SOURCE_IDS, 505, "Rerun")
    assert completed.status == "completed"
    assert (completed.labels, completed.padded, completed.linked) == (1, 1, 1)
    assert _checksums(first.folder) == {k: v for k, (v, _) in before.items()}
    assert not [p for p in first.folder.rglob(".*")], "temporary files left behind"


def test_rerun_with_other_config_is_refused_untouched(raw: Path) -> None:
    first = merge_datasets(raw, SOURCE_IDS, 506, "Config")
    before = _snapshot(first.folder)
    with pytest.raises(MergeError, match=r"Dataset506_Config.*other options.*another id with -o"):
        merge_datasets(raw, SOURCE_IDS, 506, "Config", MergeOptions(share_labels=False))
    with pytest.raises(MergeError, match="other sources"):
        merge_datasets(raw, SOURCE_IDS[:2], 506, "Config")
    assert _snapshot(first.folder) == before


def test_foreign_folder_and_taken_id_are_refused(raw: Path) -> None:
    foreign = raw / "Dataset507_Mine"
    (foreign / "imagesTr").mkdir(parents=True)
    (foreign / "dataset.json").write_text('{"labels": {"background": 0}}')
    before = _snapshot(foreign)
    with pytest.raises(MergeError, match=r"Dataset507_Mine.*not written by 'nnunet-ext merge'"):
        merge_datasets(raw, SOURCE_IDS, 507, "Mine")
    with pytest.raises(MergeError, match=r"id 507 is already taken by \['Dataset507_Mine'\].*-o"):
        merge_datasets(raw, SOURCE_IDS, 507, "Other")
    with pytest.raises(MergeError, match="one of the source ids"):
        merge_datasets(raw, SOURCE_IDS, 971, "Universal")
    assert _snapshot(foreign) == before
    assert not (raw / "Dataset507_Other").exists() and not (raw / "Dataset971_Universal").exists()
    # refused before the lock is taken: no lock files, and no temporaries of earlier merges either
    assert not temporaries(raw) and not list(raw.glob(".Dataset507_*")) and not list(raw.glob(".Dataset971_*"))


# ---------------------------------------------------------------------------- hand-made sources


def _write(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 2.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((3.0, -2.0, 1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)


def _make_source(raw: Path, dataset_id: int, name: str, labels: dict, channels: int = 1,
                 ending: str = ".nii.gz", cases: int = 2, label_values: list | None = None, **extra) -> Path:
    """A tiny raw dataset; each label map holds every plain value of ``labels`` (or ``label_values``)."""
    folder = raw / f"Dataset{dataset_id:03d}_{name}"
    values = label_values if label_values is not None else \
        sorted({v for v in labels.values() if not isinstance(v, list)})
    for i in range(cases):
        label = np.zeros((8, 8, 8), dtype=np.uint8)
        for k, value in enumerate(values):
            label[k] = value
        for c in range(channels):
            _write(np.full((8, 8, 8), 100.0 * (c + 1), dtype=np.float32), folder / "imagesTr" / f"c{i}_{c:04d}{ending}")
        _write(label, folder / "labelsTr" / f"c{i}{ending}")
    dataset_json = {"channel_names": {str(c): "MRI" for c in range(channels)}, "labels": labels,
                    "numTraining": cases, "file_ending": ending, **extra}
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    return folder


def _refuse(raw: Path, ids, match: str, **options) -> None:
    before = {p.name: _checksums(p) for p in raw.iterdir()}
    with pytest.raises(UserFacingError, match=match):
        merge_datasets(raw, ids, 900, "Out", MergeOptions(**options))
    assert {p.name: _checksums(p) for p in raw.iterdir()} == before, "a refused merge changed something"


def test_different_file_endings_are_refused(tmp_path: Path) -> None:
    _make_source(tmp_path, 1, "Nii", {"background": 0, "liver": 1})
    _make_source(tmp_path, 2, "Mha", {"background": 0, "liver": 1}, ending=".mha")
    _refuse(tmp_path, [1, 2], r"different file ending.*Dataset001_Nii.*\.nii\.gz.*Dataset002_Mha.*\.mha.*convert")


def test_region_label_colliding_with_plain_label_is_refused(tmp_path: Path) -> None:
    _make_source(tmp_path, 1, "Plain", {"background": 0, "kidney": 1, "tumor": 2})
    _make_source(tmp_path, 2, "Regions", {"background": 0, "kidney": [1, 2], "tumor": 2},
                 regions_class_order=[1, 2])
    _refuse(tmp_path, [1, 2], r"'kidney' collides with different meanings.*Dataset001_Plain.*Dataset002_Regions"
                              r".*--rename-label Regions:kidney=")
    # alone, a region-based source is refused with what to do
    _refuse(tmp_path, [2], r"Dataset002_Regions/dataset.json is region-based.*plain label")


def test_same_value_twice_and_spelling_variants_are_refused(tmp_path: Path) -> None:
    _make_source(tmp_path, 1, "Twice", {"background": 0, "liver": 1, "hepar": 1})
    _make_source(tmp_path, 2, "Lower", {"background": 0, "liver": 1})
    _make_source(tmp_path, 3, "Upper", {"background": 0, "Liver": 1})
    _refuse(tmp_path, [1, 2], r"Dataset001_Twice.*'liver' and 'hepar' both have value 1")
    _refuse(tmp_path, [2, 3], r"'Liver' of Dataset003_Upper and 'liver' of Dataset002_Lower differ only in spelling"
                              r".*--rename-label Upper:Liver=liver")
    result = merge_datasets(tmp_path, [2, 3], 900, "Out", MergeOptions(rename_labels={"Upper": {"Liver": "liver"}}))
    assert result.task_map.labels == {"background": 0, "liver": 1}


def test_undeclared_label_value_names_the_file(tmp_path: Path) -> None:
    _make_source(tmp_path, 1, "Bad", {"background": 0, "liver": 1}, label_values=[0, 1, 7])
    _refuse(tmp_path, [1], r"Dataset001_Bad/labelsTr/c0.nii.gz: label value\(s\) \[7\] are not in the dataset's "
                           r"labels \[0, 1\].*dataset.json")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_duplicate_task_names_need_task_names(tmp_path: Path) -> None:
    _make_source(tmp_path, 1, "Liver", {"background": 0, "liver": 1})
    _make_source(tmp_path, 2, "Liver", {"background": 0, "liver": 1})
    _refuse(tmp_path, [1, 2], r"\['Liver'\].*--task-names")
    result = merge_datasets(tmp_path, [1, 2], 900, "Out", MergeOptions(task_names=("L1", "L2")))
    assert result.task_map.names == ("L1", "L2")


def test_missing_channel_file_is_named(tmp_path: Path) -> None:
    folder = _make_source(tmp_path, 1, "Two", {"background": 0, "liver": 1}, channels=2)
    (folder / "imagesTr" / "c1_0001.nii.gz").unlink()
    _refuse(tmp_path, [1], r"imagesTr/c1_XXXX.nii.gz: missing channel\(s\) \[1\]")


def test_ignore_label_becomes_the_merged_ignore_label(tmp_path: Path) -> None:
    _make_source(tmp_path, 1, "Sparse", {"background": 0, "liver": 1, "ignore": 2})
    _make_source(tmp_path, 2, "Full", {"background": 0, "spleen": 1, "liver": 2})
    result = merge_datasets(tmp_path, [1, 2], 900, "Out")
    assert result.task_map.labels == {"background": 0, "liver": 1, "spleen": 2, "ignore": 3}
    assert result.task_map["Sparse"].to_source == {0: 0, 1: 1, 3: 2}
    label = _array(result.folder / "labelsTr" / "T00Sparse_c0.nii.gz")
    np.testing.assert_array_equal(label[2], 3)  # ignore voxels stay ignored (source value 2 -> 3)
    np.testing.assert_array_equal(_array(result.folder / "labelsTr" / "T01Full_c0.nii.gz")[1:3, 0, 0], [2, 1])


# ---------------------------------------------------------------------------- policies (pure)


def test_channel_name_policy() -> None:
    assert merged_channel_names([{"0": "CT"}, {"0": "CT", "1": "CT"}]) == {"0": "CT", "1": "zscore"}
    assert merged_channel_names([{"0": "CT"}, {"0": "CT"}]) == {"0": "CT"}
    assert merged_channel_names([{"0": "T2"}, {"0": "T2", "1": "ADC"}]) == {"0": "T2", "1": "ADC"}
    assert merged_channel_names([{"0": "CT"}, {"0": "T1"}]) == {"0": "zscore"}


def test_label_space_rules() -> None:
    a = SourceLabels("A", "Dataset001_A", {"background": 0, "tumour": 1, "liver": 2})
    b = SourceLabels("B", "Dataset002_B", {"background": 0, "kidney": 1, "tumour": 2})
    shared = build_label_space([a, b])
    assert shared.labels == {"background": 0, "tumour": 1, "liver": 2, "kidney": 3}
    assert shared.lookup_table("B") == {0: 0, 1: 3, 2: 1}
    separate = build_label_space([a, b], separate=["tumour"])
    assert separate.labels == {"background": 0, "A_tumour": 1, "liver": 2, "kidney": 3, "B_tumour": 4}
    with pytest.raises(LabelSpaceError, match="background"):
        build_label_space([SourceLabels("C", "Dataset003_C", {"liver": 1})])
    with pytest.raises(LabelSpaceError, match="unknown task"):
        build_label_space([a], rename={"Z": {"liver": "x"}})


# ---------------------------------------------------------------------------- CLI and stock nnU-Net


def test_cli_merges_and_reports_errors_with_exit_status_2(raw: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("nnUNet_raw", str(raw))
    assert main(["merge", "-d", "971", "973", "-o", "510", "--name", "Cli", "--rename-label",
                 "SynthKidneySpleen:spleen=milz"]) == 0
    out = capsys.readouterr().out
    assert "Dataset510_Cli" in out and "nnUNetv2_plan_and_preprocess -d 510" in out
    labels = _dataset_json(raw / "Dataset510_Cli")["labels"]
    assert labels == {"background": 0, "liver": 1, "kidney": 2, "milz": 3}
    assert main(["merge", "-d", "971", "973", "-o", "510", "--name", "Cli"]) == 2
    err = capsys.readouterr().err
    assert "nnunet-ext merge: error:" in err and "Dataset510_Cli" in err
    assert main(["merge", "-d", "971", "999", "-o", "511"]) == 2
    assert "no dataset with id 999" in capsys.readouterr().err
    assert main(["merge", "-d", "971", "-o", "512", "-np", "0"]) == 2
    assert "-np must be at least 1" in capsys.readouterr().err


class _InProcessPool:
    """Stand-in for nnU-Net's spawn pool: worker processes that import torch cost seconds each."""

    def __enter__(self) -> "_InProcessPool":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def starmap(self, func, iterable):  # noqa: ANN001 - mirrors Pool.starmap
        return [func(*args) for args in iterable]


def test_nnunet_integrity_check_accepts_the_merged_dataset(merged: Path, monkeypatch) -> None:
    """nnU-Net's own checks in-process (the fast twin of the stock-command test below)."""
    import types

    import nnunetv2.experiment_planning.verify_dataset_integrity as vdi

    context = types.SimpleNamespace(Pool=lambda *args, **kwargs: _InProcessPool())
    monkeypatch.setattr(vdi.multiprocessing, "get_context", lambda method=None: context)
    vdi.verify_dataset_integrity(str(merged), num_processes=1)  # raises on any problem


@pytest.mark.slow
def test_stock_plan_and_preprocess_accepts_the_merged_dataset(tmp_path: Path) -> None:
    """nnU-Net's own integrity check, fingerprint, planning and preprocessing on a tiny merge."""
    raw, preprocessed, results = tmp_path / "raw", tmp_path / "preprocessed", tmp_path / "results"
    for folder in (preprocessed, results):
        folder.mkdir()
    write_multi_dataset(raw, SOURCE_IDS, SyntheticSpec(num_training=2, num_test=0, shape=(16, 32, 32),
                                                       spacing=(2.5, 1.0, 1.0)))
    merge_datasets(raw, SOURCE_IDS, 520, "Stock")
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(preprocessed), nnUNet_results=str(results),
               nnUNet_def_n_proc="1", OMP_NUM_THREADS="1")
    run_stock(["nnUNetv2_plan_and_preprocess", "-d", 520, "-c", "3d_fullres", "-np", 1, "-npfp", 1,
               "--verify_dataset_integrity"], env, timeout=600)
    out = preprocessed / "Dataset520_Stock"
    plans = json.loads((out / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == \
        ["CTNormalization", "ZScoreNormalization", "ZScoreNormalization", "ZScoreNormalization"]
    assert "tasks" in json.loads((out / "dataset.json").read_text())  # nnU-Net keeps our section
    cases = sorted(p.name for p in (out / "nnUNetPlans_3d_fullres").glob("*.pkl"))
    assert len(cases) == 6 and cases[0].startswith("T00SynthLiverKidney_")
