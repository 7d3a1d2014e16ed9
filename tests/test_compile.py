"""torch.compile readiness of every registered network (issue 20).

Default run: no graph break in TransDoDNet, which runs the deformable attention of CoTr and its own
decoder (before, CoTr had 14 breaks and TransDoDNet 23, from reading level shapes out of tensors and
testing padding masks in Python) - traced by dynamo only, no code generated.

Slow run (``-m slow``): every registered network's small variant (``nnunet_ext.testing.networks``,
in each convention that builds another network) compiled with inductor (aot_eager without a C++ compiler), one training-mode
forward and backward equal to eager's within float tolerance, with the same dropout masks
(inductor's ``fallback_random``), and no graph break except those in :data:`KNOWN_BREAKS`.
"""
from __future__ import annotations

import copy
import shutil

import pytest
import torch

from small_networks import distinct_conventions, small_network


@pytest.fixture(autouse=True)
def fresh_dynamo():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: OpenMP spin-waiting on a busy 2-core machine costs more than it gains
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def backend() -> str:
    """nnU-Net's (torch.compile's default) inductor where a C++ compiler is installed, else aot_eager
    (the same graphs and autograd, no generated code)."""
    return "inductor" if any(shutil.which(c) for c in ("g++", "c++", "clang++")) else "aot_eager"


def tensors(output) -> list:
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for item in output for t in tensors(item)]


def graph_breaks(name: str, conventions: str = "default", training: bool = True) -> int:
    network, x = small_network(name, conventions)
    return torch._dynamo.explain(network.train(training))(x).graph_break_count


#: (network, conventions) -> graph breaks that remain, with the reason
KNOWN_BREAKS: dict[tuple[str, str], tuple[int, str]] = {
    # SurgicalSAM's preprocessing resizes the uint8 frame with PIL on the CPU (SAM's ResizeLongestSide):
    # one torch.compiler.disable'd call (resize_longest_side), which dynamo counts once per enclosing
    # frame (forward -> encode -> to_sam_input). ClassSAMTrainer does not compile anyway.
    ("ClassSAM", "official"): (3, "PIL resize of the uint8 frame"),
}


def test_the_deformable_attention_network_has_no_graph_breaks():
    """TransDoDNet runs the shared deformable encoder (CoTr's too) and its own task-query decoder."""
    assert graph_breaks("TransDoDNet") == 0


def fwd_bwd(network: torch.nn.Module, x: torch.Tensor, run=None) -> tuple[list, dict]:
    """Outputs and parameter gradients of one forward (``run``: the network or its compiled form)
    and backward of a fixed random weighting of the outputs."""
    torch.manual_seed(1)  # the dropout masks
    outputs = tensors((network if run is None else run)(x))
    weights = torch.Generator().manual_seed(2)
    sum((o * torch.randn(o.shape, generator=weights)).sum() for o in outputs).backward()
    return [o.detach() for o in outputs], {k: p.grad for k, p in network.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("name, conventions", distinct_conventions())
def test_compiled_training_step_equals_eager(name, conventions):
    import torch._inductor.config as inductor_config

    eager, x = small_network(name, conventions)
    compiled = copy.deepcopy(eager)
    expected, expected_grads = fwd_bwd(eager.train(), x)
    with inductor_config.patch(fallback_random=True):
        outputs, grads = fwd_bwd(compiled.train(), x, torch.compile(compiled, backend=backend()))
    assert len(outputs) == len(expected) and grads.keys() == expected_grads.keys()
    for a, b in zip(outputs, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # relative to the largest gradient: a bias before a norm has a gradient of float noise around 0
    scale = max(g.abs().max().item() for g in expected_grads.values())
    for key in grads:
        torch.testing.assert_close(grads[key], expected_grads[key], rtol=1e-4, atol=1e-5 * scale)
    assert graph_breaks(name, conventions) == KNOWN_BREAKS.get((name, conventions), (0, ""))[0]
