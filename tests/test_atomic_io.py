"""The one write path: complete-or-absent files, modes, staged folders, stale temporaries, locks."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from nnunet_ext import atomic_io
from nnunet_ext.errors import UserFacingError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(previous)


def test_write_text_and_json_land_complete(tmp_path):
    atomic_io.write_text(tmp_path / "a.txt", "hello")
    atomic_io.write_json(tmp_path / "b.json", {"x": [1, 2]})
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert (tmp_path / "b.json").read_text() == '{\n  "x": [\n    1,\n    2\n  ]\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json"]


def test_new_files_follow_the_umask(tmp_path, umask_027):
    atomic_io.write_bytes(tmp_path / "data.bin", b"x")
    atomic_io.write_text(tmp_path / "run.sh", "#!/bin/sh\n", executable=True)
    assert _mode(tmp_path / "data.bin") == 0o640
    assert _mode(tmp_path / "run.sh") == 0o750
    assert atomic_io.current_umask() == 0o027


def test_replaced_file_keeps_its_mode(tmp_path, umask_027):
    target = tmp_path / "kept.json"
    target.write_text("{}")
    target.chmod(0o604)
    atomic_io.write_json(target, {"new": True})
    assert _mode(target) == 0o604
    assert "new" in target.read_text()


def test_failure_inside_the_block_leaves_the_previous_version(tmp_path):
    target = tmp_path / "state.txt"
    atomic_io.write_text(target, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_io.atomic_open(target) as handle:
            handle.write("new, half written")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["state.txt"]


def test_writer_taking_a_path_keeps_the_target_suffix(tmp_path):
    seen = []

    def writer(path: Path) -> None:
        seen.append(path)
        path.write_bytes(b"image")

    atomic_io.write_with(tmp_path / "case_0000.nii.gz", writer)
    assert seen[0].name.endswith(".case_0000.nii.gz") and seen[0].parent == tmp_path
    assert atomic_io.is_temporary(seen[0])
    assert (tmp_path / "case_0000.nii.gz").read_bytes() == b"image"


def test_writer_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_io.write_with(tmp_path / "x.bin", lambda path: None)
    assert not (tmp_path / "x.bin").exists()


def test_kill_during_write_leaves_old_or_new_never_partial(tmp_path):
    """A child process is killed (os._exit) after writing half of the new content, before the rename."""
    target = tmp_path / "checkpoint.bin"
    atomic_io.write_bytes(target, b"A" * 1000)
    script = textwrap.dedent(f"""
        import os
        from nnunet_ext import atomic_io
        with atomic_io.atomic_open({str(target)!r}, "wb") as handle:
            handle.write(b"B" * 500)
            handle.flush()
            os._exit(9)
    """)
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    assert target.read_bytes() == b"A" * 1000
    leftovers = [p for p in tmp_path.iterdir() if atomic_io.is_temporary(p)]
    assert len(leftovers) == 1  # the dead writer's temporary, which the next start removes
    assert atomic_io.remove_stale_temporaries(tmp_path) == leftovers
    assert os.listdir(tmp_path) == ["checkpoint.bin"]


def test_live_writers_temporaries_are_not_removed(tmp_path):
    mine = tmp_path / atomic_io._private_name(atomic_io.TEMP_PREFIX, "x.bin")
    mine.write_bytes(b"in progress")
    foreign_dead = tmp_path / f"{atomic_io.TEMP_PREFIX}{atomic_io._host()}.999999999.abcd.x.bin"
    foreign_dead.write_bytes(b"dead")
    other_host_recent = tmp_path / f"{atomic_io.TEMP_PREFIX}otherhost.12.abcd.x.bin"
    other_host_recent.write_bytes(b"maybe alive")
    user_file = tmp_path / ".hidden_of_the_user"
    user_file.write_bytes(b"never touched")
    removed = atomic_io.remove_stale_temporaries(tmp_path)
    assert removed == [foreign_dead]
    assert mine.exists() and other_host_recent.exists() and user_file.exists()
    old = time.time() - atomic_io.STALE_AFTER_SECONDS - 10
    os.utime(other_host_recent, (old, old))
    assert atomic_io.remove_stale_temporaries(tmp_path) == [other_host_recent]


def test_staged_folder_appears_whole(tmp_path):
    target = tmp_path / "Dataset001_X"
    with atomic_io.staged_folder(target) as staging:
        (staging / "imagesTr").mkdir()
        (staging / "imagesTr" / "a.txt").write_text("a")
        assert not target.exists()
    assert (target / "imagesTr" / "a.txt").read_text() == "a"
    assert os.listdir(tmp_path) == ["Dataset001_X"]


def test_staged_folder_removed_on_interrupt(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_io.staged_folder(target) as staging:
            (staging / "half").write_text("x")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_staged_folder_never_replaces_an_existing_target(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(FileExistsError):
        with atomic_io.staged_folder(target) as staging:
            (staging / "new").write_text("x")
            target.mkdir()
            (target / "user.txt").write_text("user data")
    assert os.listdir(target) == ["user.txt"]
    assert os.listdir(tmp_path) == ["out"]


def test_lock_makes_the_second_run_wait_then_refuses(tmp_path, capsys):
    resource = tmp_path / "Dataset001_X"
    entered = threading.Event()
    release = threading.Event()

    def holder():
        with atomic_io.exclusive(resource, "nnunet-ext merge"):
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    entered.wait(10)
    try:
        with pytest.raises(UserFacingError, match="in use by another nnunet-ext merge"):
            with atomic_io.exclusive(resource, "nnunet-ext merge", timeout=0.2):
                pass
        assert "waiting up to 0.2 s" in capsys.readouterr().err
    finally:
        release.set()
        thread.join()
    with atomic_io.exclusive(resource, "nnunet-ext merge", timeout=0.2):
        pass  # free again


def test_lock_is_released_when_its_process_is_killed(tmp_path):
    resource = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import os
        from nnunet_ext import atomic_io
        with atomic_io.exclusive({str(resource)!r}, "test"):
            os._exit(9)
    """)
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    with atomic_io.exclusive(resource, "test", timeout=1):
        pass
