"""The registry and the paper-network builders that every method registers there."""
from __future__ import annotations

import pytest
import torch

from nnunet_ext.architectures import NETWORKS, paper_network
from nnunet_ext.registry import (METHODS, class_name, import_object, paper_networks, planner_paths,
                                 trainer_paths, unknown_name_message)
from small_networks import SMALL_NETWORKS, distinct_conventions, small_network


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


# --- every registered network: shapes and gradients ------------------------------------------------------

def test_every_registered_network_has_a_small_variant():
    assert sorted(SMALL_NETWORKS) == sorted(NETWORKS)
    for name, entry in paper_networks().items():  # of a class from the paper builder's module
        assert type(small_network(name)[0]).__module__ == import_object(entry.builder).__module__


@pytest.fixture
def one_thread():
    """Tiny networks: one thread avoids OpenMP spin-waiting on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tensors(output) -> list:
    """Every tensor of a network's output (tensor, list, tuple or named tuple of them), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for item in output for t in tensors(item)]


@pytest.mark.parametrize("name, conventions", distinct_conventions())
def test_shapes_and_gradients(name, conventions, one_thread):
    """Training-mode forward and backward of each registered network's small variant
    (nnunet_ext.testing.networks, the registry's convention keywords): the first output has the
    input's batch, size and the network's classes, every output is finite, and every trainable
    parameter gets a finite gradient."""
    network, x = small_network(name, conventions)
    outputs = tensors(network.train()(x))
    assert tuple(outputs[0].shape) == (x.shape[0], SMALL_NETWORKS[name].classes, *x.shape[2:])
    assert all(o.shape[0] == x.shape[0] and torch.isfinite(o).all() for o in outputs)
    sum((o * torch.randn_like(o)).sum() for o in outputs).backward()
    trainable = {key: p for key, p in network.named_parameters() if p.requires_grad}
    assert trainable and [key for key, p in trainable.items() if p.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())
