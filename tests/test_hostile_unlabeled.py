"""Hostile input to ``nnunet-ext preprocess-unlabeled``, the label budget, the SAM embedding cache and
ClassSAMTrainer's entry points; interrupted and concurrent preprocessing.

Each refusal must: exit non-zero, print one line naming the problem (no traceback), leave every input
byte-identical and leave no partial output (nnunet_ext.testing.hostile.assert_refused). The trainer
entry points run as under ``nnUNetv2_train``: an uncaught exception goes to ``sys.excepthook``, which
our trainers install (one line for a UserFacingError, a traceback for anything else).

Images are 16^3 voxels, two channels; the dataset is planned and preprocessed once per module,
in-process, and copied for every test.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import shutil
import sys
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext import atomic_io, compat
from nnunet_ext.embedding_cache import EmbeddingCache, build
from nnunet_ext.errors import install_excepthook
from nnunet_ext.testing.harness import NnUNetRoot
from nnunet_ext.testing.hostile import Outcome, assert_refused, run_cli, snapshot, temporaries
from nnunet_ext.unlabeled import preprocess
from nnunet_ext.unlabeled.budget import BUDGET_FILE, Budget, apply_budget
from nnunet_ext.unlabeled.convention import manifest_path, unlabeled_preprocessed_folder
from semi_support import TINY_DATASET_ID, TINY_UNLABELED, nnunet_environment, tiny_semi_root

CONFIG = "3d_fullres"
COMMAND = ["preprocess-unlabeled", "-d", str(TINY_DATASET_ID), "-c", CONFIG, "-np", "1"]


# ---------------------------------------------------------------------------------------------
# set-up: one planned tiny dataset per module, a private copy per test
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> NnUNetRoot:
    return tiny_semi_root(tmp_path_factory)


def copy_root(source: NnUNetRoot, destination: Path) -> NnUNetRoot:
    """A private copy (modification times kept, so source fingerprints match the original's)."""
    shutil.copytree(source.path, destination, symlinks=True)
    return NnUNetRoot(destination, source.dataset_id, source.dataset_name)


@pytest.fixture
def root(tiny_root, tmp_path) -> NnUNetRoot:
    return copy_root(tiny_root, tmp_path / "root")


@pytest.fixture(scope="module")
def single_run(tiny_root, tmp_path_factory) -> dict[str, bytes]:
    """What one uninterrupted run writes into the unlabelled folder (file name -> bytes)."""
    reference = copy_root(tiny_root, tmp_path_factory.mktemp("single_run") / "root")
    with nnunet_environment(reference):
        preprocess.preprocess_unlabeled(TINY_DATASET_ID, [CONFIG])
    return folder_bytes(unlabeled_folder(reference))


def unlabeled_folder(root: NnUNetRoot) -> Path:
    return unlabeled_preprocessed_folder(root.preprocessed / root.dataset_name, f"nnUNetPlans_{CONFIG}")


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def images(root: NnUNetRoot) -> Path:
    return root.dataset_raw / "imagesUnlabeled"


def cli(root: NnUNetRoot) -> Outcome:
    return run_cli(COMMAND, env=root.env())


def one_line(outcome: Outcome) -> None:
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line message:\n{outcome.stderr}"


# ---------------------------------------------------------------------------------------------
# hostile inputs to preprocess-unlabeled
# ---------------------------------------------------------------------------------------------
def _read(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path))


def _write(image: sitk.Image, path: Path) -> None:
    sitk.WriteImage(image, str(path), True)


def _with_array(path: Path, change: Callable[[np.ndarray], np.ndarray]) -> None:
    original = _read(path)
    image = sitk.GetImageFromArray(change(sitk.GetArrayFromImage(original).astype(np.float32)))
    image.CopyInformation(original)
    _write(image, path)


def truncated_gzip(root):
    path = images(root) / "synth_u000_0000.nii.gz"
    data = path.read_bytes()
    assert gzip.decompress(data)  # a valid stream before the cut
    path.write_bytes(data[: len(data) * 2 // 3])


def empty_file(root):
    (images(root) / "synth_u001_0001.nii.gz").write_bytes(b"")


def not_an_image(root):
    (images(root) / "synth_u000_0001.nii.gz").write_bytes(b"<html>404 Not Found</html>\n" * 20)


def gzip_of_garbage(root):
    (images(root) / "synth_u000_0001.nii.gz").write_bytes(gzip.compress(b"no NIfTI header here" * 50))


def two_d_in_a_3d_dataset(root):
    for channel in range(2):
        image = sitk.GetImageFromArray(np.ones((16, 16), np.float32) * (channel + 1))
        image.SetSpacing((1.0, 1.0))
        _write(image, images(root) / f"flat_{channel:04d}.nii.gz")


def channel_shape_mismatch(root):
    path = images(root) / "synth_u001_0001.nii.gz"
    original = _read(path)
    smaller = sitk.GetImageFromArray(sitk.GetArrayFromImage(original)[:, :, :12])
    smaller.SetSpacing(original.GetSpacing())
    _write(smaller, path)


def channel_spacing_mismatch(root):
    path = images(root) / "synth_u001_0001.nii.gz"
    image = _read(path)
    image.SetSpacing((1.0, 1.0, 5.0))
    _write(image, path)


def channel_direction_mismatch(root):
    path = images(root) / "synth_u001_0001.nii.gz"
    image = _read(path)
    image.SetDirection((-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    _write(image, path)


def missing_channel(root):
    (images(root) / "synth_u001_0001.nii.gz").unlink()


def extra_channel(root):
    shutil.copyfile(images(root) / "synth_u001_0001.nii.gz", images(root) / "synth_u001_0002.nii.gz")


def two_channels_in_one_file(root):
    first, second = (_read(images(root) / f"synth_u001_{c:04d}.nii.gz") for c in range(2))
    _write(sitk.JoinSeries([first, second]), images(root) / "synth_u001_0000.nii.gz")


def _as_mha(root):
    """The dataset stored as .mha: ITK's NIfTI reader turns NaN and Inf into 0 (nnU-Net never sees them),
    its MetaImage reader keeps them."""
    for path in sorted(images(root).glob("*.nii.gz")):
        _write(_read(path), path.with_name(path.name.replace(".nii.gz", ".mha")))
        path.unlink()
    for dataset_json in (root.dataset_raw / "dataset.json", root.preprocessed / root.dataset_name / "dataset.json"):
        dataset_json.write_text(json.dumps({**json.loads(dataset_json.read_text()), "file_ending": ".mha"}))


def nan_voxel(root):
    _as_mha(root)
    _with_array(images(root) / "synth_u000_0001.mha", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 7,
                                                                         np.nan, a))


def infinite_voxel(root):
    _as_mha(root)
    _with_array(images(root) / "synth_u001_0000.mha", lambda a: np.where(a == a.max(), -np.inf, a))


def nan_in_nifti(root):
    """Stored in the file; ITK's NIfTI reader (nnU-Net's) would return 0 there."""
    _with_array(images(root) / "synth_u001_0001.nii.gz", lambda a: np.where(a == a.min(), np.nan, a))


def name_of_a_labelled_case(root):
    for channel in range(2):
        shutil.copyfile(images(root) / f"synth_u000_{channel:04d}.nii.gz",
                        images(root) / f"synth_000_{channel:04d}.nii.gz")


def _copy_case_as(name: str):
    def mutate(root):
        for channel in range(2):
            shutil.copyfile(images(root) / f"synth_u000_{channel:04d}.nii.gz",
                            images(root) / f"{name}_{channel:04d}.nii.gz")
    return mutate


def no_plans(root):
    (root.preprocessed / root.dataset_name / "nnUNetPlans.json").unlink()


def corrupt_plans(root):
    (root.preprocessed / root.dataset_name / "nnUNetPlans.json").write_text('{"dataset_name": "HostileT')


def corrupt_dataset_json(root):
    (root.preprocessed / root.dataset_name / "dataset.json").write_bytes(b"\x00\x01 not json")


def not_preprocessed(root):
    shutil.rmtree(root.preprocessed / root.dataset_name / f"nnUNetPlans_{CONFIG}")


def no_dataset(root):
    shutil.rmtree(root.dataset_raw)
    shutil.rmtree(root.preprocessed / root.dataset_name)


PWNED = "PWNED_BY_NAME"

HOSTILE = [
    pytest.param(truncated_gzip, ["synth_u000_0000.nii.gz", "truncated"], id="truncated-nii-gz"),
    pytest.param(empty_file, ["synth_u001_0001.nii.gz", "empty (0 bytes)"], id="zero-bytes"),
    pytest.param(not_an_image, ["synth_u000_0001.nii.gz", "cannot be decoded"], id="not-an-image"),
    pytest.param(gzip_of_garbage, ["synth_u000_0001.nii.gz", "cannot be decoded"], id="gzip-of-garbage"),
    pytest.param(two_d_in_a_3d_dataset, ["flat_0000.nii.gz", "2D image in a 3D dataset"], id="2d-in-3d"),
    pytest.param(channel_shape_mismatch, ["synth_u001_0001.nii.gz", "shape", "one grid"], id="channel-shape"),
    pytest.param(channel_spacing_mismatch, ["synth_u001_0001.nii.gz", "spacing"], id="channel-spacing"),
    pytest.param(channel_direction_mismatch, ["synth_u001_0001.nii.gz", "direction"], id="channel-direction"),
    pytest.param(missing_channel, ["lacks channel file", "synth_u001_0001.nii.gz"], id="missing-channel"),
    pytest.param(extra_channel, ["synth_u001_0002.nii.gz", "2 channel(s)"], id="extra-channel-file"),
    pytest.param(two_channels_in_one_file, ["synth_u001_0000.nii.gz", "2 channel(s) in one file"], id="4d-file"),
    pytest.param(nan_voxel, ["synth_u000_0001.mha", "1 voxel(s) are NaN"], id="nan"),
    pytest.param(infinite_voxel, ["synth_u001_0000.mha", "NaN or infinite"], id="inf"),
    pytest.param(nan_in_nifti, ["synth_u001_0001.nii.gz", "NaN or infinite", "read them as 0"], id="nan-nifti"),
    pytest.param(name_of_a_labelled_case, ["synth_000", "also labelled cases"], id="labelled-case-name"),
    pytest.param(_copy_case_as(f'a"; touch {PWNED}; "'), ["may not contain", "'\"'", "';'"], id="name-quotes"),
    pytest.param(_copy_case_as(f"$(touch {PWNED})"), ["may not contain", "'$'", "'('"], id="name-command-substitution"),
    pytest.param(_copy_case_as(f"`touch {PWNED}`"), ["may not contain", "'`'"], id="name-backquotes"),
    pytest.param(_copy_case_as("line\nbreak"), ["may not contain", "'\\n'", "line\\nbreak"], id="name-newline"),
    pytest.param(no_plans, ["nnUNetPlans.json not found", "nnUNetv2_plan_and_preprocess -d 982"], id="no-plans"),
    pytest.param(corrupt_plans, ["nnUNetPlans.json", "cannot be read", "Plan the dataset again"], id="corrupt-plans"),
    pytest.param(corrupt_dataset_json, ["dataset.json", "cannot be read"], id="corrupt-dataset-json"),
    pytest.param(not_preprocessed, ["has not been preprocessed", "nnUNetv2_preprocess -d 982"], id="not-preprocessed"),
    pytest.param(no_dataset, ["982", "Expected a folder Dataset982_<Name>"], id="no-dataset"),
]


@pytest.mark.parametrize("mutate, needles", HOSTILE)
def test_hostile_input_is_refused_before_anything_is_written(root, tmp_path, monkeypatch, mutate, needles):
    mutate(root)
    monkeypatch.chdir(tmp_path)  # an injected `touch` would land here
    before = snapshot(root.path)
    outcome = cli(root)
    assert_refused(outcome, needles, before=before, after=snapshot(root.path),
                   absent=[unlabeled_folder(root), manifest_path(unlabeled_folder(root))], clean=[root.path])
    assert outcome.returncode == 2 and "nnunet-ext preprocess-unlabeled: error:" in outcome.stderr
    one_line(outcome)
    assert not (tmp_path / PWNED).exists(), "a file name was executed as a command"


ARGUMENTS = [
    pytest.param({"-d": f"$(touch {PWNED})"}, ["$(touch", "Expected a folder"], id="dataset-command-substitution"),
    pytest.param({"-d": "Dataset982_HostileTiny/../../elsewhere"}, ["-d", "is not a name", "'/'"], id="dataset-path"),
    pytest.param({"-p": "../nnUNetPlans"}, ["-p '../nnUNetPlans' is not a name"], id="plans-path"),
    pytest.param({"-c": "3d_fullres\nrm -rf x"}, ["-c '3d_fullres\\nrm -rf x' is not a name"], id="config-newline"),
    pytest.param({"-c": f'3d_fullres"; touch {PWNED}; "'}, ["is not in the plans", "3d_fullres"], id="config-quotes"),
]


@pytest.mark.parametrize("replace, needles", ARGUMENTS)
def test_hostile_arguments_are_refused(root, tmp_path, monkeypatch, replace, needles):
    argv = list(COMMAND) + ["-p", "nnUNetPlans"]
    for option, value in replace.items():
        argv[argv.index(option) + 1] = value
    monkeypatch.chdir(tmp_path)
    before = snapshot(root.path)
    outcome = run_cli(argv, env=root.env())
    assert_refused(outcome, needles, before=before, after=snapshot(root.path), absent=[unlabeled_folder(root)],
                   clean=[root.path])
    one_line(outcome)
    assert not (tmp_path / PWNED).exists()


def test_a_run_holding_the_output_makes_the_second_wait_then_refuses_it(root, monkeypatch):
    monkeypatch.setattr(preprocess, "LOCK_TIMEOUT_S", 0.3)
    before = snapshot(root.path)
    with atomic_io.exclusive(unlabeled_folder(root), preprocess.COMMAND):
        outcome = cli(root)
    assert_refused(outcome, ["waiting up to 0.3 s", "is in use by another nnunet-ext preprocess-unlabeled",
                             f".{unlabeled_folder(root).name}.lock", "nothing was written"],
                   before=before, after=snapshot(root.path), absent=[unlabeled_folder(root)], clean=[root.path])


# ---------------------------------------------------------------------------------------------
# interrupted and concurrent runs
# ---------------------------------------------------------------------------------------------
def _interrupt_while_preprocessing_the_second_case(monkeypatch):
    real, calls = compat.preprocess_case_and_save, []

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)  # nnU-Net has written the case into the staging folder
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(compat, "preprocess_case_and_save", interrupted)


def _interrupt_while_moving_the_second_case(monkeypatch):
    real, calls = atomic_io.move_into_place, []

    def interrupted(source, target):
        calls.append(target)
        if len(calls) == 5:  # 3 files per case: the second file of the second case
            raise KeyboardInterrupt
        real(source, target)
    monkeypatch.setattr(atomic_io, "move_into_place", interrupted)


@pytest.mark.parametrize("interrupt", [_interrupt_while_preprocessing_the_second_case,
                                       _interrupt_while_moving_the_second_case], ids=["in-preprocessing", "in-move"])
def test_ctrl_c_leaves_no_partial_case_and_a_rerun_finishes_the_job(root, single_run, monkeypatch, interrupt):
    raw_before = snapshot(root.dataset_raw)
    with monkeypatch.context() as patch:
        interrupt(patch)
        outcome = cli(root)
    assert outcome.returncode == 130 and "Interrupted." in outcome.stderr
    assert "Traceback" not in outcome.output
    folder = unlabeled_folder(root)
    first = sorted(name for name in single_run if name.startswith(TINY_UNLABELED[0]))
    assert sorted(p.name for p in folder.iterdir()) == first, "only the finished case may be there"
    assert folder_bytes(folder) == {name: single_run[name] for name in first}
    assert not manifest_path(folder).exists() and not temporaries(root.path)

    outcome = cli(root)
    assert outcome.returncode == 0, outcome.output
    assert "1 already preprocessed, 1 to do" in outcome.stdout
    assert folder_bytes(folder) == single_run, "the rerun must give exactly what one run gives"
    assert json.loads(manifest_path(folder).read_text())["cases"] == list(TINY_UNLABELED)
    assert snapshot(root.dataset_raw) == raw_before and not temporaries(root.path)

    again = cli(root)  # complete and verified: nothing is written, not even the manifest
    assert "2 already preprocessed, 0 to do" in again.stdout and folder_bytes(folder) == single_run


def test_a_damaged_stored_file_or_a_changed_source_is_redone(root, single_run):
    with nnunet_environment(root):
        preprocess.preprocess_unlabeled(TINY_DATASET_ID, [CONFIG])
        folder = unlabeled_folder(root)
        data = folder / f"{TINY_UNLABELED[1]}.b2nd"
        data.write_bytes(data.read_bytes()[:100])  # truncated by a full disk or a bad copy
        (result,) = preprocess.preprocess_unlabeled(TINY_DATASET_ID, [CONFIG])
        assert result.processed == (TINY_UNLABELED[1],) and folder_bytes(folder) == single_run
        _with_array(images(root) / f"{TINY_UNLABELED[0]}_0000.nii.gz", lambda a: a + 1)
        (result,) = preprocess.preprocess_unlabeled(TINY_DATASET_ID, [CONFIG])
        assert result.processed == (TINY_UNLABELED[0],)


def test_two_runs_at_once_take_turns_and_give_one_runs_result(root, single_run, monkeypatch, capsys):
    inside, results, errors = threading.Event(), {}, []
    real = preprocess._run_jobs

    def slow(jobs, num_processes):
        inside.set()
        if jobs:
            threading.Event().wait(1.0)  # the second run arrives while the first works
        return real(jobs, num_processes)
    monkeypatch.setattr(preprocess, "_run_jobs", slow)

    def run(name):
        try:
            results[name] = preprocess.preprocess_unlabeled(TINY_DATASET_ID, [CONFIG])[0]
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
    with nnunet_environment(root):
        first = threading.Thread(target=run, args=("first",))
        first.start()
        assert inside.wait(60)
        second = threading.Thread(target=run, args=("second",))
        second.start()
        first.join(120)
        second.join(120)
    assert not errors, errors
    assert set(results["first"].processed) == set(TINY_UNLABELED) and results["second"].processed == ()
    assert "waiting up to" in capsys.readouterr().err
    assert folder_bytes(unlabeled_folder(root)) == single_run and not temporaries(root.path)


# ---------------------------------------------------------------------------------------------
# trainer entry points: label budget, unlabelled manifest, embedding cache, ClassSAM
# ---------------------------------------------------------------------------------------------
def run_entry(function: Callable[[], object]) -> Outcome:
    """``function`` as nnUNetv2_train runs our trainer code: an uncaught exception reaches sys.excepthook
    (ours prints a UserFacingError as one line, anything else as a traceback) and the exit status is 1."""
    install_excepthook()
    try:
        function()
    except BaseException:  # noqa: BLE001 - the hook decides what the user sees
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            sys.excepthook(*sys.exc_info())
        return Outcome(1, "", stderr.getvalue())
    return Outcome(0, "", "")


def _fake_cases(count: int = 2) -> dict:
    rng = np.random.default_rng(0)
    return {f"case_{i}": (rng.normal(size=(1, 2, 8, 8)).astype(np.float32),
                          rng.integers(0, 3, size=(1, 2, 8, 8)).astype(np.int16)) for i in range(count)}


def _encoder(tiles: np.ndarray) -> np.ndarray:
    return np.broadcast_to(tiles.mean(axis=(1, 2, 3))[:, None, None, None], (len(tiles), 4, 2, 2)).copy()


def _cache(folder: Path, rebuild: bool = False) -> EmbeddingCache:
    return EmbeddingCache(folder, {"encoder": "a"}, (8, 8), (4, 2, 2), rebuild=rebuild,
                          stale_advice="or set NNUNET_EXT_SAM_CACHE_REBUILD=1")


def _build(folder: Path, rebuild: bool = False):
    cases = _fake_cases()
    return build(_cache(folder, rebuild), cases.__getitem__, cases, _encoder, batch_size=4, log=lambda *_: None)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


CACHE_DAMAGE = [
    pytest.param(lambda f: (f / "case_1.json").write_text('{"digest": "ab'), "case_1.json", "truncated or corrupt JSON",
                 id="cache-entry-truncated-json"),
    pytest.param(lambda f: (f / "case_1.json").write_text("[1, 2]"), "case_1.json", "not a JSON object",
                 id="cache-entry-not-an-object"),
    pytest.param(lambda f: _truncate(f / "case_0.emb.npy"), "case_0.emb.npy", "truncated",
                 id="cache-embeddings-truncated"),
    pytest.param(lambda f: (f / "case_0.emb.npy").write_bytes(b""), "case_0.emb.npy", "damaged",
                 id="cache-embeddings-empty"),
    pytest.param(lambda f: (f / "case_1.seg.npy").unlink(), "case_1.seg.npy", "missing", id="cache-labels-missing"),
    pytest.param(lambda f: np.save(f / "case_1.seg.npy", np.zeros((2, 4, 4), np.int16)), "case_1.seg.npy",
                 "holds int16 (2, 4, 4)", id="cache-labels-wrong-shape"),
    pytest.param(lambda f: (f / "encoder.json").write_text("{\n \"format\": 1,"), "encoder.json",
                 "records which encoder", id="cache-manifest-truncated"),
]


@pytest.mark.parametrize("damage, name, problem", CACHE_DAMAGE)
def test_a_damaged_embedding_cache_is_refused_naming_the_file(tmp_path, damage, name, problem):
    folder = tmp_path / "cache" / "Dataset1" / "2d"
    _build(folder)
    damage(folder)
    before = snapshot(tmp_path)
    outcome = run_entry(lambda: _build(folder))
    fix = "Delete that folder" if name == "encoder.json" else f"Delete {folder / name.split('.')[0]}.json"
    assert_refused(outcome, [str(folder / name), problem, fix, "NNUNET_EXT_SAM_CACHE_REBUILD=1"], before=before,
                   after=snapshot(tmp_path), clean=[tmp_path])
    one_line(outcome)
    if name != "encoder.json":  # following the advice: without the entry the case is computed again
        (folder / f"{name.split('.')[0]}.json").unlink()
        assert _build(folder).misses == [name.split(".")[0]]
        damage(folder)
    assert _build(folder, rebuild=True).hits != ["case_0", "case_1"]  # the opt-in computes it again
    assert _build(folder).hits == ["case_0", "case_1"]


class FakeDataset:
    """Stands in for nnU-Net's preprocessed dataset: ``load_case`` returns what it is given (or raises)."""

    source_folder = "/data/nnUNet_preprocessed/Dataset1/nnUNetPlans_2d"

    def __init__(self, data=None, seg=None, error: Exception | None = None):
        self.data, self.seg, self.error = data, seg, error

    def load_case(self, identifier):
        if self.error is not None:
            raise self.error
        return self.data, self.seg, None, {}


def _class_sam_case(dataset: FakeDataset):
    def run():
        from nnunet_ext.trainers.class_sam import load_checked_case

        load_checked_case(dataset, "case_7", channels=1)
    return run


def _class_sam_forward(shape):
    def run():
        import torch

        from nnunet_ext.architectures.class_sam import ClassSAM

        torch.manual_seed(0)
        ClassSAM(1, 3, sam_model_type="tiny")(torch.zeros(shape))
    return run


def _class_sam_embeddings():
    import torch

    from nnunet_ext.architectures.class_sam import ClassSAM

    ClassSAM(1, 3, sam_model_type="tiny")(image_embeddings=torch.zeros(1, 256, 64, 64), output_size=(8, 8))


def _class_sam_settings(settings):
    def run():
        from nnunet_ext.trainers.class_sam import build_class_sam

        build_class_sam(settings, 1, 3)
    return run


ZEROS = np.zeros
TRAINER_ENTRY = [
    pytest.param(_class_sam_case(FakeDataset(ZEROS((1, 3, 8, 8), np.float32), ZEROS((1, 3, 8, 6), np.int16))),
                 ["case_7", "segmentation has shape (1, 3, 8, 6)", "nnUNetv2_preprocess"], id="classsam-seg-shape"),
    pytest.param(_class_sam_case(FakeDataset(ZEROS((2, 3, 8, 8), np.float32), ZEROS((1, 3, 8, 8), np.int16))),
                 ["case_7", "2 channel(s), but dataset.json lists 1"], id="classsam-channels"),
    pytest.param(_class_sam_case(FakeDataset(ZEROS((1, 3, 4, 8, 8), np.float32), ZEROS((1, 3, 4, 8, 8), np.int16))),
                 ["case_7", "shape (1, 3, 4, 8, 8)", "not (channels, slices, y, x)"], id="classsam-5d-case"),
    pytest.param(_class_sam_case(FakeDataset(error=RuntimeError("blosc2: decompression failed\nmore"))),
                 ["case_7", "nnUNetPlans_2d", "cannot be read", "decompression failed"], id="classsam-unreadable-case"),
    pytest.param(_class_sam_forward((1, 1, 4, 16, 16)), ["ClassSAM takes 2D patches", "(1, 1, 4, 16, 16)",
                                                         "2d configuration"], id="classsam-3d-patch"),
    pytest.param(_class_sam_embeddings, ["image embeddings of shape (1, 256, 64, 64)", "tiny", "another SAM model"],
                 id="classsam-embeddings-of-another-sam"),
    pytest.param(_class_sam_settings({"sam_model_type": "tiny", "num_tokenz": 2}),
                 ["nnunet_ext_class_sam", "num_tokenz", "Use only the keys"], id="classsam-plans-typo"),
    pytest.param(_class_sam_settings({"sam_model_type": "tiny", "channel_indices": [0, 0, 5]}),
                 ["channel_indices must name 3 of the 1 input channels", "nnunet_ext_class_sam"],
                 id="classsam-plans-channels"),
]


@pytest.mark.parametrize("entry, needles", TRAINER_ENTRY)
def test_classsam_entry_points_refuse_bad_shapes_in_one_line(tmp_path, entry, needles):
    outcome = run_entry(entry)
    assert_refused(outcome, needles)
    one_line(outcome)


BUDGET_DAMAGE = [
    pytest.param(b"", "Expecting value", id="budget-empty"),
    pytest.param(b'{"budget": {"count": 2, "fraction": null}, "seed": 0, "labeled": ["a"', "Expecting",
                 id="budget-truncated"),
    pytest.param(json.dumps({"budget": {"count": 2, "fraction": 0.5}, "seed": 0, "labeled": [],
                             "unlabeled": []}).encode(), "exactly one of count and fraction", id="budget-both"),
    pytest.param(json.dumps({"budget": {"count": 2, "fraction": None}, "seed": "0", "labeled": [],
                             "unlabeled": []}).encode(), "wrong types", id="budget-wrong-types"),
]


@pytest.mark.parametrize("content, problem", BUDGET_DAMAGE)
def test_a_damaged_label_budget_file_is_refused_naming_it(tmp_path, content, problem):
    (tmp_path / BUDGET_FILE).write_bytes(content)
    before = snapshot(tmp_path)
    outcome = run_entry(lambda: apply_budget(tmp_path, ["a", "b", "c"], Budget(count=2), 0, 0))
    assert_refused(outcome, [str(tmp_path / BUDGET_FILE), "is damaged", problem, "delete it"], before=before,
                   after=snapshot(tmp_path), clean=[tmp_path])
    one_line(outcome)


def test_budget_file_is_written_through_the_write_path_and_read_back(tmp_path):
    split = apply_budget(tmp_path, ["a", "b", "c"], Budget(count=2), 0, 0)
    again = apply_budget(tmp_path, ["c", "b", "a"], Budget(count=2), 0, 0)
    assert again.reused and again.labeled == split.labeled and not temporaries(tmp_path)


@pytest.mark.parametrize("content", [b"", b'{"cases": ["a"', b'["a", "b"]', b'{"cases": "a"}'],
                         ids=["manifest-empty", "manifest-truncated", "manifest-list", "manifest-wrong-type"])
def test_a_damaged_unlabelled_manifest_is_refused_naming_it(tmp_path, content):
    folder = tmp_path / "nnUNetPlans_3d_fullres_unlabeled"
    manifest_path(folder).write_bytes(content)
    before = snapshot(tmp_path)
    outcome = run_entry(lambda: preprocess.read_manifest(folder))
    assert_refused(outcome, [str(manifest_path(folder)), "is damaged", "nnunet-ext preprocess-unlabeled"],
                   before=before, after=snapshot(tmp_path))
    one_line(outcome)
