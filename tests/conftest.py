"""Shared fixtures: one temporary nnU-Net root with the synthetic dataset for the whole session (per
pytest-xdist worker), and the order in which files are handed to the workers."""
from __future__ import annotations

import pytest

from nnunet_ext.testing.harness import NnUNetRoot, make_nnunet_root, make_universal_root, plan_and_preprocess

# Files whose stock training runs take a minute or more (pytest --durations on 2 cores), longest first.
# They are handed out first, so that the workers of `-n auto --dist loadfile` end at about the same time
# instead of one of them starting a long file when the others are done.
LONG_FILES = ("test_checkpoint_safety.py", "test_end_to_end.py", "test_banet.py", "test_universal.py",
              "test_cotr_trainer.py", "test_uniseg_trainer.py", "test_two_stream_loader.py", "test_demo.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: position for position, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: other files keep their order


@pytest.fixture(scope="session")
def nnunet_root(tmp_path_factory) -> NnUNetRoot:
    """Raw dataset written, planned and preprocessed (3d_fullres) once; tests train into it."""
    root = make_nnunet_root(tmp_path_factory.mktemp("nnunet_root"))
    plan_and_preprocess(root)
    return root


@pytest.fixture(scope="session")
def universal_root(tmp_path_factory) -> NnUNetRoot:
    """Three partially labelled datasets (1, 2, 4 channels) merged, planned and preprocessed (stock CLI)."""
    root = make_universal_root(tmp_path_factory.mktemp("universal_root"))
    plan_and_preprocess(root)
    return root
