"""The registry and the paper-network builders that every method registers there."""
from __future__ import annotations

import pytest

from nnunet_ext.architectures import NETWORKS, paper_network
from nnunet_ext.registry import (METHODS, class_name, import_object, paper_networks, planner_paths, trainer_paths,
                                 unknown_name_message)


def test_registered_names_are_unique_and_import():
    names = [class_name(p) for m in METHODS for p in m.trainers + m.planners] + [n.name for m in METHODS
                                                                              for n in m.networks]
    assert len(names) == len(set(names)), "a name is registered twice"
    assert len({m.key for m in METHODS}) == len(METHODS)
    for path in list(trainer_paths().values()) + list(planner_paths().values()):
        assert import_object(path).__name__ == class_name(path)


def test_planners_subclass_nnunet_experiment_planner():
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    for path in planner_paths().values():
        assert issubclass(import_object(path), ExperimentPlanner)


def test_unknown_network_lists_known_names():
    with pytest.raises(KeyError, match="Unknown network 'NoSuchNet'"):
        paper_network("NoSuchNet")


def test_unknown_name_message_suggests_close_matches():
    message = unknown_name_message("trainer", "CoTrTrainr", ["CoTrTrainer", "BANetTrainer"])
    assert "Did you mean: CoTrTrainer," in message and "Known trainers: BANetTrainer, CoTrTrainer" in message


@pytest.mark.parametrize("name", NETWORKS)
def test_registry_counts_are_consistent_with_the_official_code(name):
    """Exact counts per convention (tests/test_conventions.py counts the built networks): the official
    convention has the official implementation's count wherever it is known, and a network without
    official builder keywords is the same network in both conventions."""
    entry = paper_networks()[name]
    assert entry.parameters > 0 and entry.official_parameters > 0
    if entry.paper_parameters is not None:
        assert entry.official_parameters == entry.paper_parameters
    if not entry.official_kwargs:
        assert entry.parameters == entry.official_parameters
    if entry.trainable_parameters is not None:
        assert entry.trainable_parameters < entry.parameters
