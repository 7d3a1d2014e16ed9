"""Crash-safe checkpoints (issue 16): one atomic write with the method state inside, and what ``--c`` /
``--val`` do with what a killed job left behind.

* Our save equals nnU-Net's own ``save_checkpoint`` (same keys and values) plus ``nnunet_ext_state``.
* Fault injection: a child process (fork of a trainer trained for one epoch in-process) saves a
  checkpoint and is ended with ``os._exit`` before, inside or after one file operation of the save
  (open of the temporary file, each write, flush, close, fsync, chmod, replace, the folder's fsync),
  every operation in turn. After each crash the checkpoint name holds its previous complete file or
  the new complete one, the temporary file is removed at the next start, and a resumed trainer gets
  the method state of that file. Kinds: a semi-supervised trainer (MC-Net+, ``training_iteration``)
  and a universal one (the task map). One real ``nnUNetv2_train --c`` per kind resumes after a crash
  and finishes. The default run covers the semi-supervised kind; the universal kind, every write of
  the save and in-process full resumes run under ``-m slow``.
* Hostile trainer entry points: empty, truncated, garbage, non-checkpoint and bad-checksum files fall
  back with a warning; all unreadable -> one-line error; no method state -> loud warning; stale
  temporaries removed (a live process's kept); file modes follow the umask or the replaced file.
"""
from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import math
import os
import shutil
import stat
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from nnunet_ext import atomic_io, compat
from nnunet_ext.errors import UserFacingError
from nnunet_ext.testing.harness import UNIVERSAL_DATASET_ID, NnUNetRoot, stock_command
from nnunet_ext.testing.hostile import Outcome, assert_refused, run_command, snapshot, temporaries
from nnunet_ext.trainers.base import METHOD_STATE_KEY
from nnunet_ext.trainers.mcnet import MCNetPlusTrainer
from nnunet_ext.trainers.universal import nnUNetUniversalTrainer
from semi_support import SEMI_DATASET_ID, nnunet_environment, semi_root

KILLED = 86  # exit status of a child ended by the fault injector
FINAL, LATEST, BEST = compat.CHECKPOINT_NAMES


# ---------------------------------------------------------------------------------------------
# fault injection
# ---------------------------------------------------------------------------------------------
class FaultInjector:
    """Counts the file operations of a save and ends the process (``os._exit(KILLED)``) before, inside
    or after operation number ``crash_at``. Counted: ``open`` for writing, that file's writes, flush and
    close, and ``os.open/fsync/close/chmod/replace/rename/unlink/remove`` (what atomic_io calls); reads
    (``current_umask`` reads /proc) are not counted.

    torch.save writes a file named by a path with its own C++ writer, out of Python's reach; here it
    gets an unbuffered Python file instead, so that each of its writes is one counted write(2) of the
    same bytes in the same order ("after" leaves the bytes in the file, "inside" half of them). The
    states a crash can leave are the same: the temporary file holds a prefix of the archive.
    """

    OS_FUNCTIONS = ("open", "fsync", "close", "chmod", "replace", "rename", "unlink", "remove")

    def __init__(self, crash_at: int | None = None, when: str = "after"):
        self.crash_at, self.when = crash_at, when
        self.trace: list[tuple[str, int]] = []  # (operation, bytes for writes)
        self._saved: dict[str, Any] = {}

    def operation(self, name: str, run: Callable[[], Any], size: int = 0, partial: Callable[[], Any] | None = None):
        index = len(self.trace)
        self.trace.append((name, size))
        if index == self.crash_at:
            if self.when == "before":
                os._exit(KILLED)
            if self.when == "inside" and partial is not None:
                partial()
                os._exit(KILLED)
        result = run()
        if index == self.crash_at:
            os._exit(KILLED)
        return result

    def install(self) -> None:
        real_open = builtins.open
        self._saved = {"builtins.open": real_open, **{name: getattr(os, name) for name in self.OS_FUNCTIONS}}

        def counted_open(file, mode="r", *args, **kwargs):
            if not any(flag in mode for flag in "wax+"):
                return real_open(file, mode, *args, **kwargs)
            assert mode == "wb", f"the checkpoint writer opened {file} with mode {mode!r}"
            return CountedFile(self.operation("open", lambda: real_open(file, "wb", buffering=0)), self)

        builtins.open = counted_open
        real_save = self._saved["torch.save"] = torch.save

        def save_through_python(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)):
                with open(f, "wb") as handle:  # counted_open
                    return real_save(obj, handle, *args, **kwargs)
            return real_save(obj, f, *args, **kwargs)

        torch.save = save_through_python
        for name in self.OS_FUNCTIONS:
            real = self._saved[name]
            setattr(os, name, lambda *a, _name=name, _real=real, **k: self.operation(f"os.{_name}",
                                                                                     lambda: _real(*a, **k)))

    def uninstall(self) -> None:
        builtins.open = self._saved["builtins.open"]
        torch.save = self._saved["torch.save"]
        for name in self.OS_FUNCTIONS:
            setattr(os, name, self._saved[name])


class CountedFile:
    """An unbuffered file whose writes, flush and close are counted operations of a FaultInjector."""

    def __init__(self, raw, injector: FaultInjector):
        self.raw, self.injector = raw, injector

    def _write_all(self, view: memoryview) -> None:
        done = 0
        while done < len(view):
            done += self.raw.write(view[done:])

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.injector.operation("write", lambda: self._write_all(view), size=len(view),
                                partial=lambda: self._write_all(view[:len(view) // 2]))
        return len(view)

    def flush(self) -> None:
        self.injector.operation("flush", self.raw.flush)

    def close(self) -> None:
        self.injector.operation("close", self.raw.close)

    def fileno(self) -> int:
        return self.raw.fileno()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save_in_child(trainer, path: Path, crash_at: int | None = None, when: str = "after",
                  trace_file: Path | None = None) -> int:
    """``trainer.save_checkpoint(path)`` in a forked child under a FaultInjector; the child's exit code."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 0
        try:
            injector = FaultInjector(crash_at, when)
            injector.install()
            trainer.save_checkpoint(str(path))
            injector.uninstall()
            if trace_file is not None:
                trace_file.write_text(json.dumps(injector.trace))
        except BaseException:  # noqa: BLE001 - reported through the exit code
            traceback.print_exc()
            code = 99
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def trace_of_save(trainer, path: Path, scratch: Path) -> list[tuple[str, int]]:
    """The file operations of one complete save to ``path`` (run in a child; ``path`` is restored after)."""
    before = path.read_bytes() if path.exists() else None
    trace_file = scratch / "trace.json"
    assert save_in_child(trainer, path, trace_file=trace_file) == 0
    restore(path, before)
    return [tuple(step) for step in json.loads(trace_file.read_text())]


def crash_points(trace: list[tuple[str, int]], every_write: bool) -> list[tuple[int, str]]:
    """(operation index, before/inside/after): before the first operation, after every operation
    (= before the next one: nothing touches a file in between) and inside every write. Writes: all
    of them, or (default suite) the first, the largest and the last; the others only add more
    prefixes of the same temporary file, which no outcome depends on."""
    writes = [i for i, (name, _) in enumerate(trace) if name == "write"]
    largest = max(writes, key=lambda i: trace[i][1])
    chosen = set(writes) if every_write else {writes[0], largest, writes[-1]}
    points = [(0, "before")]
    for index, (name, _) in enumerate(trace):
        if name != "write":
            points.append((index, "after"))
        elif index in chosen:
            points += [(index, "inside"), (index, "after")]
    return points


def restore(path: Path, content: bytes | None) -> None:
    if content is None:
        path.unlink(missing_ok=True)
    else:
        path.write_bytes(content)


# ---------------------------------------------------------------------------------------------
# comparing checkpoints
# ---------------------------------------------------------------------------------------------
def assert_same(a, b, where: str = "checkpoint") -> None:
    """Recursive equality of two checkpoint values: same structure, same keys in the same order,
    tensors equal in dtype, shape and values, NaN equal to NaN."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu()), where
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, (float, np.floating)) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def fingerprint(value, digest=None) -> str:
    """A digest of a checkpoint's structure and values (tensors by dtype, shape and bytes): equal
    fingerprints, equal checkpoints. Cheaper than ``assert_same`` for thousands of comparisons."""
    top = digest is None
    digest = hashlib.blake2b() if top else digest
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous()
        digest.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}".encode())
        for key, item in value.items():
            digest.update(repr(key).encode())
            fingerprint(item, digest)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__}{len(value)}".encode())
        for item in value:
            fingerprint(item, digest)
    else:
        digest.update(f"{type(value).__name__}:{value!r}".encode())
    return digest.hexdigest() if top else ""


def loaded_state(trainer) -> dict:
    """What a resumed trainer got: epoch, method state, weights."""
    return {"current_epoch": trainer.current_epoch, "method_state": trainer.method_state(),
            "weights": {k: v.detach().clone() for k, v in compat.unwrapped_network(trainer).state_dict().items()}}


def expected_state(checkpoint: dict) -> dict:
    return {"current_epoch": checkpoint["current_epoch"], "method_state": checkpoint[METHOD_STATE_KEY],
            "weights": dict(checkpoint["network_weights"])}


# ---------------------------------------------------------------------------------------------
# the two trainer kinds, each trained for one epoch in-process (short schedule, CPU)
# ---------------------------------------------------------------------------------------------
@dataclass
class Kind:
    name: str
    root: NnUNetRoot
    dataset_id: int
    trainer_class: type
    results: Path
    trainer: Any = None

    @contextlib.contextmanager
    def environment(self, epochs: int = 1):
        with nnunet_environment(self.root, epochs=epochs) as patch:
            patch.setenv("nnUNet_results", str(self.results))
            patch.setenv("nnUNet_n_proc_DA", "0")
            yield patch

    def new_trainer(self, continue_training: bool = True):
        with self.environment():
            folder = self.root.preprocessed / self.root.dataset_name
            plans = json.loads((folder / "nnUNetPlans.json").read_text())
            dataset_json = json.loads((folder / "dataset.json").read_text())
            return compat.instantiate_trainer(self.trainer_class, plans, "3d_fullres", 0, dataset_json,
                                              torch.device("cpu"), continue_training)

    @property
    def fold(self) -> Path:
        return Path(self.trainer.output_folder)

    def reset_method_state(self, trainer) -> list:
        """Make a resumed trainer's method state wrong where it can be (a counter to -1), so that the load
        has to set it; returns the list of states the load then hands to ``load_method_state``."""
        if hasattr(trainer, "training_iteration"):
            trainer.training_iteration = -1
        handed = []
        load = type(trainer).load_method_state
        trainer.load_method_state = lambda state: (handed.append(state), load(trainer, state))[1]
        return handed

    def advance(self, trainer) -> None:
        """Turn the trained state into another one (what the next save writes): other method state
        (where the method has a counter) and weights."""
        if hasattr(trainer, "training_iteration"):
            trainer.training_iteration += 5
        with torch.no_grad():
            next(compat.unwrapped_network(trainer).parameters()).add_(1.0)

    def stock_train(self, epochs: int, *extra: str, fold: int = 0, **variables: str) -> Outcome:
        """``nnUNetv2_train`` of this kind's trainer on CPU, as a user types it."""
        env = self.root.env(epochs=epochs, iterations=2, nnUNet_results=str(self.results), nnUNet_n_proc_DA="0",
                            **variables)
        for name in ("NNUNET_EXT_LABEL_BUDGET", "NNUNET_EXT_LABEL_BUDGET_SEED"):
            env.pop(name, None)
        return run_command([stock_command("nnUNetv2_train"), str(self.dataset_id), "3d_fullres", str(fold),
                            "-tr", self.trainer_class.__name__, "-device", "cpu", *extra], env, timeout=900)


def _trained_kind(kind: Kind) -> Kind:
    with kind.environment():
        kind.trainer = kind.new_trainer(continue_training=False)
        kind.trainer.run_training()  # 1 epoch x 2 iterations: checkpoint_final and checkpoint_best
    assert (kind.fold / FINAL).is_file() and (kind.fold / BEST).is_file()
    return kind


@pytest.fixture(scope="module")
def semi(tmp_path_factory) -> Kind:
    root = semi_root(tmp_path_factory)
    return _trained_kind(Kind("semi", root, SEMI_DATASET_ID, MCNetPlusTrainer, tmp_path_factory.mktemp("semi_results")))


@pytest.fixture(scope="module")
def universal(universal_root, tmp_path_factory) -> Kind:
    return _trained_kind(Kind("universal", universal_root, UNIVERSAL_DATASET_ID, nnUNetUniversalTrainer,
                              tmp_path_factory.mktemp("universal_results")))


@pytest.fixture(params=["semi", "universal"])
def kind(request) -> Kind:
    return request.getfixturevalue(request.param)


@contextlib.contextmanager
def later_state(kind: Kind):
    """The kind's trainer in another state for the block (saved with checkpoint_final's epoch, as the
    save at the end of that epoch would be), then put back to checkpoint_final."""
    kind.advance(kind.trainer)
    kind.trainer.current_epoch = compat.read_checkpoint(kind.fold / FINAL)["current_epoch"] - 1
    try:
        yield compat.nnunet_checkpoint(kind.trainer) | {METHOD_STATE_KEY: kind.trainer.method_state()}
    finally:
        kind.trainer.load_checkpoint(str(kind.fold / FINAL))


# ---------------------------------------------------------------------------------------------
# one write, nnU-Net's content
# ---------------------------------------------------------------------------------------------
class _DDPLike(torch.nn.Module):
    """What DistributedDataParallel looks like to a save: the network under ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.mark.parametrize("variant", ["plain", "ddp", "compiled", "grad_scaler"])
def test_our_checkpoint_is_nnunets_own_save_plus_the_method_state(semi, tmp_path, variant):
    """Saved by nnU-Net's nnUNetTrainer.save_checkpoint and by ours from the same trainer: the same keys in
    the same order with the same values, plus nnunet_ext_state. A release of nnU-Net that adds, drops
    or changes a key fails here."""
    trainer = semi.trainer
    saved = {name: getattr(trainer, name) for name in ("network", "is_ddp", "grad_scaler")}
    try:
        if variant == "ddp":
            trainer.network, trainer.is_ddp = _DDPLike(trainer.network), True
        elif variant == "compiled":
            trainer.network = torch.compile(trainer.network)  # an OptimizedModule; compiled only when called
        elif variant == "grad_scaler":
            trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        compat.base_trainer_class().save_checkpoint(trainer, str(tmp_path / "nnunet.pth"))
        trainer.save_checkpoint(str(tmp_path / "ours.pth"))
    finally:
        for name, value in saved.items():
            setattr(trainer, name, value)
    theirs = torch.load(tmp_path / "nnunet.pth", map_location="cpu", weights_only=False)
    ours = torch.load(tmp_path / "ours.pth", map_location="cpu", weights_only=False)
    assert list(ours) == list(theirs) + [METHOD_STATE_KEY]
    assert ours.pop(METHOD_STATE_KEY) == {"training_iteration": 2}
    assert_same(ours, theirs)
    assert not any(key.startswith(("module.", "_orig_mod.")) for key in ours["network_weights"])
    assert (ours["grad_scaler_state"] is None) == (variant != "grad_scaler")
    assert sorted(os.listdir(tmp_path)) == ["nnunet.pth", "ours.pth"], "a temporary file was left"


@pytest.mark.parametrize("situation", ["other_rank", "checkpointing_disabled"])
def test_no_checkpoint_where_nnunet_writes_none(semi, tmp_path, situation):
    trainer = semi.trainer
    attribute, value = ("local_rank", 1) if situation == "other_rank" else ("disable_checkpointing", True)
    old = getattr(trainer, attribute)
    log_before = Path(trainer.log_file).read_text()
    setattr(trainer, attribute, value)
    try:
        assert compat.nnunet_checkpoint(trainer) is None
        trainer.save_checkpoint(str(tmp_path / "c.pth"))
    finally:
        setattr(trainer, attribute, old)
    assert os.listdir(tmp_path) == []
    logged = Path(trainer.log_file).read_text()[len(log_before):]
    assert logged.count("No checkpoint written, checkpointing is disabled") == \
        (2 if situation == "checkpointing_disabled" else 0)  # nnU-Net's message, from both calls above


# ---------------------------------------------------------------------------------------------
# crash at every file operation of a save
# ---------------------------------------------------------------------------------------------
def crash_sweep(kind: Kind, name: str, tmp_path: Path, every_write: bool, full_resume: bool = False) -> dict:
    """Crash a save of ``fold/name`` at every point. After each: the name holds its previous complete
    file (byte-identical; or none) or the new complete one (intact archive, content equal to what was
    saved), and the next start removes the temporary file. A trainer resumed as ``--c`` does gets the
    method state of the file it loads (checked for the first crash point that leaves each outcome, or
    for every point with ``full_resume``, then trained to the end in-process). Returns how many
    crash points left each outcome."""
    path = kind.fold / name
    previous = path.read_bytes() if path.exists() else None
    others = {other: _identity(kind.fold / other) for other in compat.CHECKPOINT_NAMES if other != name}
    resumer = kind.new_trainer()
    counts = {"previous": 0, "new": 0}
    with later_state(kind) as new:
        new_fingerprint = fingerprint(new)
        trace = trace_of_save(kind.trainer, path, tmp_path)
        replace = [i for i, (op, _) in enumerate(trace) if op == "os.replace"]
        assert len(replace) == 1 and [op for op, _ in trace[:2]] == ["open", "write"], trace[:3]
        for index, when in crash_points(trace, every_write):
            where = f"crash {when} operation {index} ({trace[index][0]}) of {len(trace)}"
            restore(path, previous)
            assert save_in_child(kind.trainer, path, index, when) == KILLED, where
            replaced = index > replace[0] or (index == replace[0] and when != "before")
            if replaced:
                assert fingerprint(compat.read_intact_checkpoint(path)) == new_fingerprint, where
            elif previous is None:
                assert not path.exists(), where
            else:
                assert path.read_bytes() == previous, where
            assert {other: _identity(kind.fold / other) for other in others} == others, f"{where}: other names"
            outcome = "new" if replaced else "previous"
            removed = atomic_io.remove_stale_temporaries(kind.fold)  # what the next start does
            assert not temporaries(kind.fold), where
            assert len(removed) == (0 if replaced or (index, when) == (0, "before") else 1), (where, removed)
            if counts[outcome] == 0 or full_resume:
                # nnU-Net's --c picks final, else latest, else best; our load takes the first intact one
                chosen = next(kind.fold / n for n in compat.CHECKPOINT_NAMES if (kind.fold / n).is_file())
                handed = kind.reset_method_state(resumer)
                resumer.load_checkpoint(str(chosen))
                expected = new if chosen == path and replaced else compat.read_checkpoint(chosen)
                assert_same(loaded_state(resumer), expected_state(expected), where)
                assert handed == [expected[METHOD_STATE_KEY]], where
                if full_resume:
                    resume_in_process(kind, chosen, expected)
            counts[outcome] += 1
        restore(path, previous)  # before later_state reloads checkpoint_final
    return counts


def _identity(path: Path) -> tuple | None:
    """(inode, size, mtime) of a file, None when absent: changes when the file is written or replaced."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return status.st_ino, status.st_size, status.st_mtime_ns


def resume_in_process(kind: Kind, chosen: Path, expected: dict) -> None:
    """A whole ``--c`` in this process: load, train to the end of epoch current+1, check the method state."""
    with kind.environment(epochs=expected["current_epoch"] + 1):
        trainer = kind.new_trainer()
        trainer.load_checkpoint(str(chosen))
        assert trainer.method_state() == expected[METHOD_STATE_KEY]
        trainer.run_training()
        final = compat.read_intact_checkpoint(Path(trainer.output_folder) / FINAL)
        assert final["current_epoch"] == expected["current_epoch"] + 1
        if "training_iteration" in expected[METHOD_STATE_KEY]:
            assert final[METHOD_STATE_KEY]["training_iteration"] == \
                expected[METHOD_STATE_KEY]["training_iteration"] + 2
        else:
            assert final[METHOD_STATE_KEY] == expected[METHOD_STATE_KEY]


# the universal kind (a trained universal model, ~45 s) is slow: its save path is the semi-supervised one's,
# only the method state differs (task map; its save and load: test_universal.py, test_uniseg_trainer.py)
@pytest.mark.parametrize("kind", ["semi", pytest.param("universal", marks=pytest.mark.slow)], indirect=True)
@pytest.mark.parametrize("name", [FINAL, LATEST], ids=["replacing_final", "first_latest"])
def test_a_crash_anywhere_in_a_save_leaves_the_previous_or_the_new_checkpoint(kind, tmp_path, name):
    counts = crash_sweep(kind, name, tmp_path, every_write=False)
    assert counts["previous"] >= 13 and counts["new"] >= 4, counts


@pytest.mark.slow  # ~3000 crash points per kind, plus an in-process resume to the end for the non-write ones
def test_crash_at_every_write_and_full_resumes(kind, tmp_path):
    crash_sweep(kind, FINAL, tmp_path, every_write=True)
    backup = tmp_path / "backup"
    shutil.copytree(kind.fold, backup)
    try:
        crash_sweep(kind, FINAL, tmp_path, every_write=False, full_resume=True)
    finally:
        shutil.rmtree(kind.fold)
        shutil.copytree(backup, kind.fold)


# the universal run (70-90 s, mostly nnU-Net's final validation) is slow; its save path is the
# semi-supervised one's, and the default crash sweeps cover both kinds
@pytest.mark.parametrize("kind", ["semi", pytest.param("universal", marks=pytest.mark.slow)], indirect=True)
def test_stock_continue_after_a_crash_mid_save_resumes_and_finishes(kind, tmp_path):
    """A job killed while writing checkpoint_final: the old file is intact, a partial temporary lies
    beside it. ``nnUNetv2_train --c`` removes the temporary, resumes with the saved method state and
    finishes the second epoch (training, checkpoint, validation)."""
    path = kind.fold / FINAL
    previous = compat.read_checkpoint(path)
    backup = tmp_path / "fold_backup"
    shutil.copytree(kind.fold, backup)
    try:
        with later_state(kind):
            trace = trace_of_save(kind.trainer, path, tmp_path)
            largest = max((i for i, (op, _) in enumerate(trace) if op == "write"), key=lambda i: trace[i][1])
            assert save_in_child(kind.trainer, path, largest, "inside") == KILLED
        left = temporaries(kind.fold)
        assert len(left) == 1 and 0 < left[0].stat().st_size
        completed = kind.stock_train(2, "--c")
        output = completed.output
        assert completed.returncode == 0, output[-4000:]
        assert "Traceback" not in output
        assert not temporaries(kind.fold), "the stale temporary was not removed"
        assert f"removed {left[0]}, left by an interrupted save" in output
        final = compat.read_intact_checkpoint(path)
        assert final["current_epoch"] == 2 == previous["current_epoch"] + 1
        if kind.name == "semi":
            assert "resumed at training iteration 2" in output
            assert final[METHOD_STATE_KEY] == {"training_iteration": 4}
        else:
            assert final[METHOD_STATE_KEY] == previous[METHOD_STATE_KEY]
        assert len(final["logging"]["train_losses"]) == 2
        assert json.loads((kind.fold / "validation" / "summary.json").read_text())["metric_per_case"]
        if kind.name == "universal":  # written through atomic_io.write_json
            assert json.loads((kind.fold / "validation" / "summary_per_task.json").read_text())
        assert not temporaries(kind.fold)
    finally:
        shutil.rmtree(kind.fold)
        shutil.copytree(backup, kind.fold)
        kind.trainer.load_checkpoint(str(path))


# ---------------------------------------------------------------------------------------------
# hostile checkpoints at --c / --val
# ---------------------------------------------------------------------------------------------
def _truncate(path: Path, keep: Callable[[int], int]) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "empty": (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    "truncated_half": (lambda p: _truncate(p, lambda n: n // 2), "truncated"),
    "truncated_tail": (lambda p: _truncate(p, lambda n: n - 7), "truncated"),
    "garbage": (lambda p: p.write_text("not a checkpoint\n"), "not a PyTorch checkpoint"),
    "not_a_checkpoint": (lambda p: torch.save({"weights": torch.ones(3)}, p), "is not an nnU-Net checkpoint"),
    "bad_checksum": (_flip_middle_byte, "corrupt"),
    "hostile_content": (lambda p: p.write_bytes(b'"; touch /tmp/pwned; "$(id)\n\x00'), "not a PyTorch checkpoint"),
}


def test_checkpoints_saved_without_checksums_are_not_called_corrupt(semi, tmp_path):
    """torch can save without CRC-32 (``compute_crc32`` off: every record's CRC is 0); such a file is intact."""
    from torch.utils.serialization import config

    with config.patch({"save.compute_crc32": False}):
        semi.trainer.save_checkpoint(str(tmp_path / FINAL))
    assert compat.read_intact_checkpoint(tmp_path / FINAL)[METHOD_STATE_KEY] == {"training_iteration": 2}
    _truncate(tmp_path / FINAL, lambda n: n - 100)
    with pytest.raises(compat.UnreadableCheckpoint, match="truncated"):
        compat.read_intact_checkpoint(tmp_path / FINAL)


@pytest.fixture
def three_checkpoints(semi, tmp_path) -> dict[str, Path]:
    """A fold folder with final / latest / best of three training iterations (7, 6, 5)."""
    folder = tmp_path / "fold_0"
    folder.mkdir()
    paths = {}
    trainer = semi.trainer
    for name, iteration in ((FINAL, 7), (LATEST, 6), (BEST, 5)):
        trainer.training_iteration = iteration
        trainer.save_checkpoint(str(folder / name))
        paths[name] = folder / name
    trainer.training_iteration = 2
    return paths


def _load_with_fresh_trainer(semi: Kind, path: Path):
    with semi.environment():
        trainer = semi.new_trainer()
        trainer.training_iteration = -1
        trainer.load_checkpoint(str(path))
    return trainer


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_unreadable_final_falls_back_to_latest_with_a_warning(semi, three_checkpoints, capfd, corruption):
    damage, reason = CORRUPTIONS[corruption]
    damage(three_checkpoints[FINAL])
    before = snapshot(three_checkpoints[FINAL].parent)
    trainer = _load_with_fresh_trainer(semi, three_checkpoints[FINAL])
    assert trainer.training_iteration == 6, "latest (iteration 6) should have been loaded"
    err = capfd.readouterr().err
    assert f"nnunet-ext: WARNING: checkpoint {three_checkpoints[FINAL]} " in err and reason in err, err
    assert f"trying {three_checkpoints[LATEST]} instead" in err
    assert str(three_checkpoints[FINAL]) in Path(trainer.log_file).read_text()
    assert snapshot(three_checkpoints[FINAL].parent) == before, "a load changed the checkpoints"


@pytest.mark.parametrize("corruption", ["empty", "truncated_half"])
def test_unreadable_final_and_latest_fall_back_to_best(semi, three_checkpoints, capfd, corruption):
    damage, _ = CORRUPTIONS[corruption]
    damage(three_checkpoints[FINAL])
    damage(three_checkpoints[LATEST])
    trainer = _load_with_fresh_trainer(semi, three_checkpoints[FINAL])
    assert trainer.training_iteration == 5
    err = capfd.readouterr().err
    assert err.count("nnunet-ext: WARNING: checkpoint") == 2 and str(three_checkpoints[BEST]) in err


def test_missing_best_requested_by_val_best_falls_back_to_final(semi, three_checkpoints, capfd):
    three_checkpoints[BEST].unlink()  # --val_best loads checkpoint_best.pth whether it exists or not
    trainer = _load_with_fresh_trainer(semi, three_checkpoints[BEST])
    assert trainer.training_iteration == 7
    assert "No such file" in capfd.readouterr().err


@pytest.mark.parametrize("corruption", ["empty", "truncated_half", "garbage"])
def test_no_intact_checkpoint_is_one_error_naming_every_file_and_the_fix(semi, three_checkpoints, corruption):
    for path in three_checkpoints.values():
        CORRUPTIONS[corruption][0](path)
    with pytest.raises(UserFacingError) as error:
        _load_with_fresh_trainer(semi, three_checkpoints[FINAL])
    message = str(error.value)
    assert "\n" not in message
    for path in three_checkpoints.values():
        assert str(path) in message
    assert "Restore a copy" in message and "delete them to start this fold anew" in message


def test_stock_continue_with_only_unreadable_checkpoints_is_refused_in_one_line(semi, tmp_path):
    """nnUNetv2_train --c when every checkpoint of the fold is damaged: one line, no traceback, the files untouched."""
    backup = tmp_path / "fold_backup"
    shutil.copytree(semi.fold, backup)
    try:
        _truncate(semi.fold / FINAL, lambda n: n // 3)
        (semi.fold / BEST).write_bytes(b"")
        before = snapshot(semi.fold / FINAL, semi.fold / BEST)
        outcome = semi.stock_train(2, "--c")
        assert_refused(outcome, ["no intact checkpoint", str(semi.fold / FINAL), str(semi.fold / BEST),
                                 "empty (0 bytes)", "truncated", "Restore a copy"],
                       before=before, after=snapshot(semi.fold / FINAL, semi.fold / BEST), clean=[semi.fold])
        errors = [line for line in outcome.stderr.splitlines() if line.startswith("nnunet-ext: error:")]
        assert len(errors) == 1, outcome.stderr
    finally:
        shutil.rmtree(semi.fold)
        shutil.copytree(backup, semi.fold)


@pytest.mark.parametrize("writer", ["nnunet_save", "torch_save_without_state"])
def test_checkpoint_without_method_state_is_reported_loudly(semi, tmp_path, capfd, writer):
    path = tmp_path / FINAL
    semi.trainer.training_iteration = 9
    if writer == "nnunet_save":
        compat.base_trainer_class().save_checkpoint(semi.trainer, str(path))  # what nnUNetTrainer writes
    else:
        torch.save(compat.nnunet_checkpoint(semi.trainer), path)
    semi.trainer.training_iteration = 2
    with semi.environment():
        trainer = semi.new_trainer()
        trainer.load_checkpoint(str(path))
    assert trainer.training_iteration == 0, "nothing to restore: the initial value stays"
    err = capfd.readouterr().err
    for text in (str(path), "no nnunet-ext method state", "MCNetPlusTrainer's method state (training_iteration)",
                 "STARTS AGAIN FROM ITS INITIAL VALUE"):
        assert text in err, err
        assert text in Path(trainer.log_file).read_text()


def test_trainer_without_method_state_loads_nnunet_checkpoints_silently(semi, tmp_path, capfd):
    from nnunet_ext.trainers.base import nnUNetExtTrainer

    plain = Kind("plain", semi.root, SEMI_DATASET_ID, nnUNetExtTrainer, tmp_path)
    trainer = plain.new_trainer(continue_training=False)
    with plain.environment():
        trainer.initialize()
    compat.base_trainer_class().save_checkpoint(trainer, str(tmp_path / FINAL))
    trainer.load_checkpoint(str(tmp_path / FINAL))
    assert "WARNING" not in capfd.readouterr().err


def test_stale_temporaries_are_removed_at_the_next_start_and_a_live_writers_kept(semi, tmp_path):
    fold, validation = semi.fold, semi.fold / "validation"
    validation.mkdir(exist_ok=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = atomic_io._host()
        stale = [fold / f"{atomic_io.TEMP_PREFIX}{host}.{dead.pid}.0badc0de.{FINAL}",
                 validation / f"{atomic_io.TEMP_PREFIX}{host}.{dead.pid}.0badc0de.summary.json"]
        kept = fold / f"{atomic_io.TEMP_PREFIX}{host}.{live.pid}.0badc0de.{LATEST}"
        for path in stale + [kept]:
            path.write_bytes(b"partial")
        with semi.environment():
            trainer = semi.new_trainer()
            trainer.initialize()
        assert not any(path.exists() for path in stale) and kept.exists()
        log = Path(trainer.log_file).read_text()
        assert all(f"removed {path}, left by an interrupted save" in log for path in stale)
    finally:
        live.kill()
        live.wait()
        kept.unlink(missing_ok=True)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_checkpoints_follow_the_umask_and_replaced_ones_keep_their_mode(semi, tmp_path, umask):
    old = os.umask(umask)
    try:
        semi.trainer.save_checkpoint(str(tmp_path / "new.pth"))
        (tmp_path / "kept.pth").write_bytes(b"old")
        os.chmod(tmp_path / "kept.pth", 0o640)
        semi.trainer.save_checkpoint(str(tmp_path / "kept.pth"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.pth").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "kept.pth").stat().st_mode) == 0o640
    assert compat.read_intact_checkpoint(tmp_path / "kept.pth")[METHOD_STATE_KEY] == {"training_iteration": 2}


def test_stock_train_with_a_bad_short_run_value_is_one_line(semi):
    """The other bad values are checked in-process (tests/test_base_trainer.py); this one goes through
    nnUNetv2_train, whose traceback our excepthook replaces with one line."""
    value = "$(id)"
    outcome = semi.stock_train(1, fold=1, NNUNET_EXT_ITERS_PER_EPOCH=value)
    assert_refused(outcome, [f"nnunet-ext: error: NNUNET_EXT_ITERS_PER_EPOCH={value!r} is not a positive whole "
                             f"number", "unset NNUNET_EXT_ITERS_PER_EPOCH"])
    assert not (semi.fold.parent / "fold_1" / FINAL).exists()
