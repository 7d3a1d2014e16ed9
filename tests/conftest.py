"""Shared fixtures: one temporary nnU-Net root with the synthetic dataset for the whole session."""
from __future__ import annotations

import pytest

from nnunet_ext.testing.harness import NnUNetRoot, make_nnunet_root, make_universal_root, plan_and_preprocess


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
