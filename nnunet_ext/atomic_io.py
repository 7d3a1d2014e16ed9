"""The one write path of nnunet-ext: every file we write appears complete or not at all.

A file is written to a temporary name in its target folder, flushed and fsynced, given the
permissions it should have, then moved over the target with ``os.replace`` (atomic on POSIX within
one file system) and the folder entry fsynced. A process killed at any instant therefore leaves the
target name either with its previous complete content or with its new complete content, and at
worst a temporary file whose name says whose it is (``.nnunet_ext_tmp.<host>.<pid>.<random>.<name>``,
removed by :func:`remove_stale_temporaries` at the next start).

Folders (merged datasets, converted releases, a case's preprocessed files) are built in a staging
folder beside the target (:func:`staged_folder`) and moved into place at the end.

Permissions: a new file gets what ``open()`` would give it under the user's umask (0666 & ~umask,
0777 & ~umask for executables); a replaced file keeps its mode.

Concurrent runs on one output take a lock (:func:`exclusive`, on ``filelock``): the second run
waits for ``timeout`` seconds with a message, then is refused with a message naming the lock.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import stat
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from nnunet_ext.errors import UserFacingError

TEMP_PREFIX = ".nnunet_ext_tmp."
STAGING_PREFIX = ".nnunet_ext_staging."
#: temporaries of another host (a shared cluster file system) are only removed when this old
STALE_AFTER_SECONDS = 24 * 3600


def _host() -> str:
    return socket.gethostname().split(".")[0].replace(".", "_") or "host"


def _private_name(prefix: str, target_name: str) -> str:
    # the target's own name comes last so that writers that choose the format by suffix
    # (SimpleITK: .nii.gz, .mha; numpy: .npy) write the same format to the temporary file
    return f"{prefix}{_host()}.{os.getpid()}.{secrets.token_hex(4)}.{target_name}"


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(target: Path, executable: bool) -> int:
    try:
        return stat.S_IMODE(target.stat().st_mode)  # a replaced file keeps its mode
    except FileNotFoundError:
        return (0o777 if executable else 0o666) & ~current_umask()


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename or new entry in ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file that a third-party writer (torch.save, SimpleITK) closed to stable storage."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def move_into_place(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """``os.replace`` plus an fsync of the target's folder: the one rename every writer here uses."""
    os.replace(source, target)
    fsync_folder(Path(target).parent)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, executable: bool = False, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` for a writer that wants a file name; on success the
    file is fsynced, given its mode and moved over ``target``. On any exception (also Ctrl-C) the
    temporary file is removed and ``target`` is untouched.

    ``durable=False`` skips the fsyncs (the rename is still atomic against a killed process, but not
    against a power loss); only for scratch files that are rebuilt anyway.
    """
    target = Path(target)
    temporary = target.parent / _private_name(TEMP_PREFIX, target.name)
    try:
        yield temporary
        if not temporary.exists():
            raise FileNotFoundError(f"the writer of {target} wrote nothing to {temporary}")
        if durable:
            fsync_file(temporary)
        os.chmod(temporary, _mode_for(target, executable))
        os.replace(temporary, target)
        if durable:
            fsync_folder(target.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


@contextlib.contextmanager
def atomic_open(target: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8",
                executable: bool = False) -> Iterator[IO[Any]]:
    """``open(target, mode)`` whose content appears at ``target`` only when the block finishes."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}")
    with atomic_path(target, executable=executable) as temporary:
        with open(temporary, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()


def write_bytes(target: str | os.PathLike, data: bytes, *, executable: bool = False) -> None:
    with atomic_open(target, "wb", executable=executable) as handle:
        handle.write(data)


def write_text(target: str | os.PathLike, text: str, *, executable: bool = False) -> None:
    with atomic_open(target, "w", executable=executable) as handle:
        handle.write(text)


def write_json(target: str | os.PathLike, content: Any, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    """JSON with a trailing newline, written atomically."""
    write_text(target, json.dumps(content, indent=indent, sort_keys=sort_keys) + "\n")


def write_with(target: str | os.PathLike, writer: Callable[[Path], Any]) -> None:
    """Atomic write through a third-party writer that takes a path (``sitk.WriteImage``, ``torch.save``)."""
    with atomic_path(target) as temporary:
        writer(temporary)


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a private, empty staging folder beside ``target``; on success it becomes ``target``.

    Without ``replace``, ``target`` must not exist when the block ends (the caller decides what an
    existing one means). With ``replace``, an existing ``target`` is moved aside only once the new
    folder is complete, and removed after the swap (put back if the swap fails). On any exception
    the staging folder is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / _private_name(STAGING_PREFIX, target.name)
    staging.mkdir()
    previous: Path | None = None
    try:
        yield staging
        fsync_folder(staging)
        if target.exists() and replace:
            previous = target.parent / _private_name(STAGING_PREFIX, f"{target.name}.previous")
            os.rename(target, previous)
        if target.exists():
            raise FileExistsError(f"{target} appeared while it was being built in {staging}")
        os.rename(staging, target)  # a folder: rename refuses to replace an existing non-empty one
        fsync_folder(target.parent)
    except BaseException:
        if previous is not None and previous.exists() and not target.exists():
            os.rename(previous, target)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def link_into_place(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Make ``target`` a symbolic link to ``source`` (absolute), atomically replacing what was there.

    Not through :func:`atomic_path`: its chmod would follow the link and change the source's mode.
    """
    target = Path(target)
    temporary = target.parent / _private_name(TEMP_PREFIX, target.name)
    os.symlink(os.path.abspath(source), temporary)
    try:
        move_into_place(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def private_folder(beside: str | os.PathLike, label: str = "") -> Path:
    """Create and return an empty folder of this process beside ``beside`` (a staging name, so once the
    process is gone :func:`remove_stale_temporaries` removes whatever of it is left). The caller
    empties and removes it; :func:`staged_folder` and :func:`scratch_folder` do that themselves."""
    beside = Path(beside)
    beside.parent.mkdir(parents=True, exist_ok=True)
    folder = beside.parent / _private_name(STAGING_PREFIX, f"{beside.name}.{label}" if label else beside.name)
    folder.mkdir()
    return folder


@contextlib.contextmanager
def scratch_folder(beside: str | os.PathLike) -> Iterator[Path]:
    """A private working folder next to ``beside`` (same file system, so results can be moved out of it
    atomically), always deleted at the end; a killed run's leftover carries a staging name, so the next
    run's :func:`remove_stale_temporaries` removes it."""
    folder = private_folder(beside, "scratch")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _owner_is_gone(name: str, prefix: str, now: float, path: Path) -> bool:
    parts = name[len(prefix):].split(".", 3)
    if len(parts) < 4:
        return False
    host, pid = parts[0], parts[1]
    if host == _host() and pid.isdigit():
        if int(pid) == os.getpid():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    try:
        return now - path.lstat().st_mtime > STALE_AFTER_SECONDS
    except OSError:
        return False


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove temporaries and staging folders in ``folder`` left by killed runs (never a live run's).

    Only names this module makes are touched; returns what was removed.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for path in folder.iterdir():
        for prefix in (TEMP_PREFIX, STAGING_PREFIX):
            if path.name.startswith(prefix) and _owner_is_gone(path.name, prefix, now, path):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        path.unlink()
                removed.append(path)
    return removed


def is_temporary(path: str | os.PathLike) -> bool:
    """True for this module's temporary files and staging folders (to skip them when listing)."""
    name = Path(path).name
    return name.startswith(TEMP_PREFIX) or name.startswith(STAGING_PREFIX)


@contextlib.contextmanager
def exclusive(resource: str | os.PathLike, what: str, *, timeout: float = 60.0) -> Iterator[None]:
    """Hold ``<resource>.lock`` (an OS lock: released when the process dies, even by kill -9).

    A second run waits up to ``timeout`` seconds, saying so once, and is then refused with a
    message that names the lock. ``what`` names the command for the messages.
    """
    from filelock import FileLock, Timeout

    resource = Path(resource)
    resource.parent.mkdir(parents=True, exist_ok=True)
    lock_file = resource.parent / f".{resource.name}.lock"
    lock = FileLock(os.fspath(lock_file))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"nnunet-ext: another {what} is using {resource}; waiting up to {timeout:g} s for it to finish "
              f"(lock {lock_file})", file=sys.stderr, flush=True)
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise UserFacingError(
                f"{resource} is in use by another {what} (lock {lock_file} held for more than {timeout:g} s); "
                f"nothing was written. Wait for that run to finish and run this again.") from None
    try:
        yield
    finally:
        lock.release()
