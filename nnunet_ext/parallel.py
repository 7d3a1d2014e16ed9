"""Progress bars and worker processes for the commands that loop over cases.

* :func:`progress`: a tqdm bar on stderr (tqdm, as nnU-Net's own progress bars), shown only when
  stderr is a terminal: a log file or a pipe (a cluster job) gets no bar and needs no flag.
* :class:`Workers` / :func:`imap`: ``func`` over jobs, in ``num_processes`` worker processes when
  more than one is asked (``spawn``, as nnU-Net's preprocessing, so no lock or thread state of the
  caller is inherited), else in this process. Results come back as they are done, in job order or
  not (``ordered``); the workers ignore Ctrl-C, which reaches the main process only, and leaving
  early (an error, Ctrl-C) terminates them. ``Workers`` keeps one set of processes for several
  loops (merge checks, then writes).
"""
from __future__ import annotations

import contextlib
import multiprocessing
import signal
import sys
import threading
from typing import Any, Callable, Generator, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")

__all__ = ["Workers", "children_ignore_ctrl_c", "imap", "progress", "show_progress"]


def show_progress() -> bool:
    """Whether progress bars are shown: stderr is a terminal."""
    stream = sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str | None = None) -> Any:
    """``tqdm(iterable, total, desc)`` on stderr, disabled unless stderr is a terminal."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not show_progress(), file=sys.stderr, leave=False,
                dynamic_ncols=True)


@contextlib.contextmanager
def children_ignore_ctrl_c() -> Iterator[None]:
    """Processes started inside inherit an ignored SIGINT (it survives exec); the main process's handler
    is back afterwards. Only the main thread can change it; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _ignore_ctrl_c() -> None:
    """Pool initializer (also for a pool started outside the main thread)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Workers:
    """Up to ``num_processes`` spawned worker processes shared by several :meth:`imap` calls (started at the
    first call that has more than one job, stopped when the ``with`` block ends, also on Ctrl-C or an error).
    With ``num_processes`` 1 everything runs in this process."""

    def __init__(self, num_processes: int = 1) -> None:
        self.num_processes = max(1, int(num_processes))
        self._pool: Any = None

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes (terminated: what they were doing is not wanted any more)."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def imap(self, func: Callable[[Any], T], jobs: Sequence[Any], *, ordered: bool = True,
             chunksize: int = 1) -> Generator[T, None, None]:
        """``func(job)`` for every job, in the workers (``func`` and the jobs must then be picklable) or, with one
        process or one job, here. An exception of a job is raised here, with its type; then, as when the
        generator is closed before its end, the workers are stopped at once (a later call starts new ones)."""
        if self.num_processes <= 1 or len(jobs) <= 1:
            yield from map(func, jobs)
            return
        if self._pool is None:
            with children_ignore_ctrl_c():
                self._pool = multiprocessing.get_context("spawn").Pool(min(self.num_processes, len(jobs)),
                                                                       initializer=_ignore_ctrl_c)
        mapper = self._pool.imap if ordered else self._pool.imap_unordered
        try:
            yield from mapper(func, jobs, chunksize=chunksize)
        except BaseException:  # a job's error, Ctrl-C, or the caller stopped early (GeneratorExit)
            self.close()  # stop the jobs still running before the caller cleans up after them
            raise


def imap(func: Callable[[Any], T], jobs: Sequence[Any], num_processes: int = 1, *, ordered: bool = True,
         chunksize: int = 1) -> Generator[T, None, None]:
    """:meth:`Workers.imap` in workers of its own, stopped when the results are consumed or the generator is
    closed (use ``contextlib.closing`` so that an error or Ctrl-C in the caller's loop stops them at once)."""
    with Workers(num_processes) as workers:
        yield from workers.imap(func, jobs, ordered=ordered, chunksize=chunksize)
