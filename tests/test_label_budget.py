"""Label-budget mode: parsing, reproducible choice, the saved file, and the trainer's split step."""
from __future__ import annotations

import json

import pytest

from nnunet_ext import compat
from nnunet_ext.unlabeled.budget import (BUDGET_FILE, BUDGET_VARIABLE, SEED_VARIABLE, Budget, LabelBudgetError,
                                         apply_budget, budget_from, choose_labeled, parse_budget)
from semi_support import import_test_trainer, make_trainer, nnunet_environment, semi_root

CASES = [f"case_{i:03d}" for i in range(40)]


@pytest.mark.parametrize("value, expected", [
    ("8", Budget(count=8)), (8, Budget(count=8)), (" 12 ", Budget(count=12)),
    ("0.1", Budget(fraction=0.1)), (0.25, Budget(fraction=0.25)), ("10%", Budget(fraction=0.1)),
    ("1.0", Budget(fraction=1.0)),
])
def test_parse_count_fraction_percentage(value, expected):
    assert parse_budget(value) == expected


@pytest.mark.parametrize("bad", ["0", "-3", "1.5", "0.0", "ten", "", "0%", "150%", True])
def test_bad_budget_names_the_variable_and_the_fix(bad):
    with pytest.raises(LabelBudgetError, match=f"{BUDGET_VARIABLE}=.*Set {BUDGET_VARIABLE} to a number"):
        parse_budget(bad)


def test_fraction_and_count_resolve_as_papers_count():
    assert Budget(fraction=0.1).resolve(80) == 8 and Budget(fraction=0.2).resolve(80) == 16  # LA 10% / 20%
    assert Budget(fraction=0.25).resolve(6) == 2  # 1.5 rounds half up
    assert Budget(fraction=0.01).resolve(10) == 1  # never zero labelled cases
    assert Budget(count=12).resolve(62) == 12
    with pytest.raises(LabelBudgetError, match="more than the 4 training cases"):
        Budget(count=5).resolve(4)


def test_environment_wins_over_the_attribute_and_seed_is_checked():
    assert budget_from(None, 0, {}) == (None, 0)
    assert budget_from(0.2, 3, {}) == (Budget(fraction=0.2), 3)
    assert budget_from(0.2, 3, {BUDGET_VARIABLE: "8", SEED_VARIABLE: "7"}) == (Budget(count=8), 7)
    with pytest.raises(LabelBudgetError, match=SEED_VARIABLE):
        budget_from(None, 0, {SEED_VARIABLE: "-1"})


def test_choice_is_reproducible_a_partition_and_depends_on_fold_and_seed():
    labeled, unlabeled = choose_labeled(CASES, Budget(count=8), seed=0, fold=0)
    assert len(labeled) == 8 and sorted(labeled + unlabeled) == CASES and not set(labeled) & set(unlabeled)
    assert choose_labeled(list(reversed(CASES)), Budget(count=8), 0, 0) == (labeled, unlabeled)  # order-free
    assert choose_labeled(CASES, Budget(fraction=0.2), 0, 0)[0] == labeled  # 0.2 x 40 = the same 8
    assert choose_labeled(CASES, Budget(count=8), 0, 1)[0] != labeled
    assert choose_labeled(CASES, Budget(count=8), 1, 0)[0] != labeled
    assert choose_labeled(CASES, Budget(count=8), 0, "all")[0] != labeled


def test_saved_then_read_back_and_a_different_setting_is_refused(tmp_path):
    first = apply_budget(tmp_path, CASES, Budget(count=8), 0, 0)
    saved = json.loads((tmp_path / BUDGET_FILE).read_text())
    assert saved["labeled"] == first.labeled and saved["unlabeled"] == first.unlabeled and not first.reused
    assert saved["seed"] == 0 and saved["fold"] == 0 and saved["num_labeled"] == 8
    again = apply_budget(tmp_path, list(reversed(CASES)), Budget(count=8), 0, 0)
    assert again.reused and again.labeled == first.labeled
    with pytest.raises(LabelBudgetError, match=rf"{BUDGET_FILE}.*budget 8 cases \(now 0.1 of.*{BUDGET_VARIABLE}=8"):
        apply_budget(tmp_path, CASES, Budget(fraction=0.1), 0, 0)
    with pytest.raises(LabelBudgetError, match=r"seed 0 \(now 5\)"):
        apply_budget(tmp_path, CASES, Budget(count=8), 5, 0)
    with pytest.raises(LabelBudgetError, match="different set of training cases"):
        apply_budget(tmp_path, CASES[:-1], Budget(count=8), 0, 0)
    with pytest.raises(LabelBudgetError, match=f"{BUDGET_VARIABLE} is not set"):
        apply_budget(tmp_path, CASES, None, 0, 0)
    assert json.loads((tmp_path / BUDGET_FILE).read_text()) == saved, "a refused run must not rewrite the file"


def test_no_budget_no_file_and_other_ranks_do_not_write(tmp_path):
    assert apply_budget(tmp_path, CASES, None, 0, 0) is None
    split = apply_budget(tmp_path, CASES, Budget(count=3), 0, 2, write=False)
    assert len(split.labeled) == 3 and not (tmp_path / BUDGET_FILE).exists()


# ---------------------------------------------------------------------------------------------
# the trainer's split step
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return semi_root(tmp_path_factory)


def nnunet_split(root, fold):
    with nnunet_environment(root):
        trainer = make_trainer(root, compat.base_trainer_class(), fold=fold)
        return trainer.do_split()


@pytest.mark.parametrize("fold", [1, 2])
def test_trainer_split_takes_the_budget_from_nnunets_training_part_only(root, fold):
    training, validation = nnunet_split(root, fold)
    cls = import_test_trainer()
    with nnunet_environment(root, **{BUDGET_VARIABLE: "0.5", SEED_VARIABLE: "3"}):
        trainer = make_trainer(root, cls, fold=fold)
        labeled, val = trainer.do_split()
        assert val == validation, "validation must be nnU-Net's, unchanged"
        assert len(labeled) == int(len(training) * 0.5 + 0.5) and set(labeled) < set(training)  # half up
        assert sorted(labeled + trainer.unlabeled_training_keys) == sorted(training)
        saved = json.loads((root.results / root.dataset_name / f"{cls.__name__}__nnUNetPlans__3d_fullres" /
                            f"fold_{fold}" / BUDGET_FILE).read_text())
        assert saved["labeled"] == sorted(labeled) and saved["seed"] == 3

        resumed = make_trainer(root, cls, fold=fold, continue_training=True)  # what --c creates
        assert resumed.do_split()[0] == labeled
    with nnunet_environment(root, **{BUDGET_VARIABLE: "1"}):
        with pytest.raises(LabelBudgetError, match="earlier run of this fold"):
            make_trainer(root, cls, fold=fold).do_split()


def test_trainer_without_budget_uses_every_label(root):
    training, validation = nnunet_split(root, 3)
    with nnunet_environment(root):
        trainer = make_trainer(root, import_test_trainer(), fold=3)
        assert trainer.do_split() == (training, validation) and trainer.unlabeled_training_keys == []
