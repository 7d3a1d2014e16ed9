"""What a challenge module declares beyond its release layout: submission formats and the container interface.

Types only. :mod:`nnunet_ext.challenges.submission` builds and validates submissions from a
:class:`SubmissionFormat`; :mod:`nnunet_ext.challenges.infer` (``nnunet-ext challenge-infer``) reads
and writes the files of a :class:`ContainerInterface`; :mod:`nnunet_ext.challenges.registry` says which
module of which challenge provides them. Each fact stored here names its source in the challenge's
module and how-to page.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class SubmissionFormat:
    """What one challenge (task, phase) accepts as prediction files, and how nnU-Net's predictions get there.

    ``archive_folder``: the files go into a zip, inside this folder (AMOS22: ``results/``); None: a folder
    of files. ``selects``: which test images belong to the task (AMOS22 task 1: the CT ids); None: all.
    ``official_count``: the number of cases the challenge expects, where its rules state one.
    """

    challenge: str
    title: str
    phase: str
    case_pattern: re.Pattern
    extension: str
    prediction_values: frozenset[int]  # allowed in nnU-Net's predictions (the dataset's label values)
    submission_values: frozenset[int]
    release_image: str  # path of a case's image in the release's test folder, "{case}" replaced
    example_case: str
    channels: tuple[tuple[str, tuple[int, ...]], ...] | None = None  # 4D: per channel, the predicted values
    archive_folder: str | None = None
    selects: Callable[[str], bool] | None = None
    official_count: int | None = None
    source: str = ""

    def example(self) -> str:
        return self.example_case + self.extension

    def to_submission(self, labels: np.ndarray) -> np.ndarray:
        """A prediction's label map -> the submission array (3D uint8 labels, or [N, ...] uint8 masks)."""
        if self.channels is None:
            return labels.astype(np.uint8)
        return np.stack([np.isin(labels, values) for _, values in self.channels]).astype(np.uint8)


@dataclass(frozen=True)
class InputSlot:
    """One input of an algorithm container: the files in ``folder`` (below the input root; "" = the root)."""

    folder: str
    extension: str
    what: str  # what the image is, for messages ("non-contrast CT")


@dataclass(frozen=True)
class ContainerInterface:
    """Where a challenge's algorithm container finds its inputs and writes its outputs.

    ``inputs`` are in the model's channel order; every output file is named like the first input's file
    and written in ``output``'s format (extension, values, data type, 4D stack) into ``output_folder``.
    ``assumed``: the organisers' pages found do not state the interface; the how-to page says so.
    """

    inputs: tuple[InputSlot, ...]
    output_folder: str
    output: SubmissionFormat
    source: str
    assumed: bool = False
