"""Label-budget mode: reproduce semi-supervised papers on fully labelled datasets.

Papers report e.g. "LA with 10% / 20% labels" or "Pancreas-CT with 12 labelled cases": of each
training split only N cases keep their labels, the rest are used as unlabelled images. Here:

* the budget is ``NNUNET_EXT_LABEL_BUDGET`` (or a trainer's ``label_budget`` attribute; the variable
  wins): a whole number ``8`` is a count of cases, a decimal ``0.1`` or a percentage ``10%`` is a
  fraction of the fold's training cases, rounded half up, at least 1;
* which cases is decided only by the fold's training cases, the fold and a seed
  (``NNUNET_EXT_LABEL_BUDGET_SEED``, default 0): the sorted case list is sampled with NumPy's
  ``default_rng(SeedSequence([seed, crc32(fold)]))``, so the choice is reproducible on any machine
  and independent between folds; validation cases are never touched (nnU-Net validates as usual);
* the choice is saved as ``label_budget.json`` in the fold's results folder. A rerun or ``--c``
  reads it back and refuses a different budget, seed or training split instead of silently
  training on other labels. It is written through :mod:`nnunet_ext.atomic_io` (complete or absent);
  a damaged file is refused with a message naming it.
"""
from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from nnunet_ext import atomic_io
from nnunet_ext.errors import UserFacingError

BUDGET_VARIABLE = "NNUNET_EXT_LABEL_BUDGET"
SEED_VARIABLE = "NNUNET_EXT_LABEL_BUDGET_SEED"
BUDGET_FILE = "label_budget.json"


class LabelBudgetError(UserFacingError):
    """Bad budget value, or a saved budget that disagrees with the current run."""


@dataclass(frozen=True)
class Budget:
    """How many training cases keep their labels: ``count`` cases, or ``fraction`` of them."""

    count: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        if (self.count is None) == (self.fraction is None):
            raise ValueError("give exactly one of count and fraction")

    def resolve(self, num_training: int) -> int:
        """Number of labelled cases for a split of ``num_training`` cases."""
        if self.count is not None:
            if self.count > num_training:
                raise LabelBudgetError(
                    f"label budget of {self.count} cases is more than the {num_training} training cases of this "
                    f"fold. Set {BUDGET_VARIABLE} to at most {num_training} (or a fraction such as 0.2).")
            return self.count
        assert self.fraction is not None  # a budget is a count or a fraction
        return max(1, min(num_training, math.floor(self.fraction * num_training + 0.5)))

    def describe(self) -> str:
        return f"{self.count} cases" if self.count is not None else f"{self.fraction:g} of the training cases"

    def to_json(self) -> dict:
        return {"count": self.count, "fraction": self.fraction}


def parse_budget(value: int | float | str, source: str = BUDGET_VARIABLE) -> Budget:
    """``8`` -> 8 cases; ``0.1``, ``"0.1"`` or ``"10%"`` -> a fraction. Anything else raises, naming ``source``."""
    text = str(value).strip()
    fix = (f"Set {source} to a number of labelled cases (e.g. 8), a fraction in (0, 1] (e.g. 0.1) or a percentage "
           f"(e.g. 10%), or unset it to use every label.")
    try:
        if isinstance(value, bool):
            raise ValueError
        if text.endswith("%"):
            fraction = float(text[:-1]) / 100.0
        elif isinstance(value, int) or text.isdigit():
            count = int(text)
            if count < 1:
                raise ValueError
            return Budget(count=count)
        else:
            fraction = float(text)
    except ValueError:
        raise LabelBudgetError(f"{source}={text!r} is not a label budget. {fix}") from None
    if not 0.0 < fraction <= 1.0 or math.isnan(fraction):
        raise LabelBudgetError(f"{source}={text!r} is not a fraction in (0, 1]. {fix}")
    return Budget(fraction=fraction)


def budget_from(attribute: int | float | str | None, seed_attribute: int,
                environ: Mapping[str, str] = os.environ) -> tuple[Budget | None, int]:
    """(budget, seed) from the environment, else from the trainer's attributes; ``None`` = all labels."""
    text = environ.get(BUDGET_VARIABLE, "").strip()
    budget = parse_budget(text) if text else (None if attribute is None else parse_budget(attribute, "label_budget"))
    seed_text = environ.get(SEED_VARIABLE, "").strip()
    try:
        seed = int(seed_text) if seed_text else int(seed_attribute)
        if seed < 0:
            raise ValueError
    except ValueError:
        raise LabelBudgetError(f"{SEED_VARIABLE}={seed_text!r} is not a whole number >= 0. Set it to e.g. 0, or "
                               f"unset it.") from None
    return budget, seed


def choose_labeled(training_cases: Sequence[str], budget: Budget, seed: int,
                   fold: int | str) -> tuple[list[str], list[str]]:
    """(labelled, unlabelled) case lists, both sorted; depends only on the set of cases, budget, seed and fold."""
    import numpy as np

    cases = sorted(set(training_cases))
    if not cases:
        raise LabelBudgetError("this fold has no training cases to take a label budget from.")
    count = budget.resolve(len(cases))
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(str(fold).encode())]))
    chosen = set(rng.choice(len(cases), size=count, replace=False).tolist())
    labeled = [case for index, case in enumerate(cases) if index in chosen]
    return labeled, [case for index, case in enumerate(cases) if index not in chosen]


@dataclass(frozen=True)
class BudgetSplit:
    labeled: list[str]
    unlabeled: list[str]
    path: Path
    reused: bool  # read back from an earlier run


def apply_budget(output_folder: str | os.PathLike, training_cases: Sequence[str], budget: Budget | None, seed: int,
                 fold: int | str, write: bool = True) -> BudgetSplit | None:
    """Choose (or read back) this fold's labelled cases and save them; ``None`` when no budget is set.

    ``write=False`` (DDP ranks other than 0) computes the same choice without writing the file.
    """
    path = Path(output_folder) / BUDGET_FILE
    saved = read_saved_budget(path)
    if budget is None:
        if saved is not None:
            raise LabelBudgetError(
                f"{path} says this fold was trained with a label budget of {_saved_budget_text(saved)} (seed "
                f"{saved['seed']}), but {BUDGET_VARIABLE} is not set. Set "
                f"{BUDGET_VARIABLE}={_saved_budget_value(saved)} "
                f"{SEED_VARIABLE}={saved['seed']} to continue it, or train into a new results folder.")
        return None
    cases = sorted(set(training_cases))
    if saved is not None:
        mismatches = []
        if saved["budget"] != budget.to_json():
            mismatches.append(f"budget {_saved_budget_text(saved)} (now {budget.describe()})")
        if saved["seed"] != seed:
            mismatches.append(f"seed {saved['seed']} (now {seed})")
        if sorted(saved["labeled"] + saved["unlabeled"]) != cases:
            mismatches.append("a different set of training cases (splits_final.json changed?)")
        if mismatches:
            raise LabelBudgetError(
                f"{path} was written by an earlier run of this fold with {'; '.join(mismatches)}. Set "
                f"{BUDGET_VARIABLE}={_saved_budget_value(saved)} {SEED_VARIABLE}={saved['seed']} to continue that run, "
                f"or train into a new results folder (another trainer name or plans) for a new budget.")
        return BudgetSplit(list(saved["labeled"]), list(saved["unlabeled"]), path, reused=True)
    labeled, unlabeled = choose_labeled(cases, budget, seed, fold)
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_io.write_json(path, {
            "budget": budget.to_json(), "seed": seed, "fold": fold, "num_training_cases": len(cases),
            "num_labeled": len(labeled), "labeled": labeled, "unlabeled": unlabeled,
            "note": "Written by nnunet-ext's label-budget mode: only 'labeled' cases of this fold's training split "
                    "keep their labels; 'unlabeled' ones are used as unlabelled images. Validation is unchanged.",
        })
    return BudgetSplit(labeled, unlabeled, path, reused=False)


def read_saved_budget(path: Path) -> dict | None:
    """The saved choice of an earlier run (None if there is none); a damaged file is refused, naming it."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        budget = saved["budget"]
        Budget(count=budget["count"], fraction=budget["fraction"])
        if not isinstance(saved["seed"], int) or not all(
                isinstance(saved[key], list) and all(isinstance(c, str) for c in saved[key])
                for key in ("labeled", "unlabeled")):
            raise TypeError("wrong types")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        problem = str(error).splitlines()[0][:100] if str(error) else type(error).__name__
        raise LabelBudgetError(
            f"{path} is damaged ({problem}); it records which training cases of this fold keep their labels. "
            f"Restore it from a backup, or delete it to have the same choice made again (it is reproducible from "
            f"{BUDGET_VARIABLE}, {SEED_VARIABLE}, the fold and its training cases).") from None
    return saved


def _saved_budget_text(saved: dict) -> str:
    budget = saved["budget"]
    return Budget(count=budget["count"], fraction=budget["fraction"]).describe()


def _saved_budget_value(saved: dict) -> str:
    budget = saved["budget"]
    return str(budget["count"]) if budget["count"] is not None else f"{budget['fraction']:g}"
