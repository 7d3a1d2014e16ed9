"""Every loss of nnunet-ext lives in nnunet_ext/losses; each is checked here against a slow reference
written out from the official code (MC-Net+, LeFeD, DoDNet). The partial-label, boundary and class-prompt
losses are tested with their trainers (test_universal.py, test_banet.py, test_class_sam.py)."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnunet_ext.architectures.dodnet import SigmoidLabelCoding
from nnunet_ext.architectures.lefed import LeFeDOutput
from nnunet_ext.losses.semi_supervised import (LeFeDLoss, MCNetDiceLoss, mutual_consistency_loss, official_dice_loss,
                                               sharpen)
from nnunet_ext.losses.task_sigmoid import DoDNetLoss
from nnunet_ext.tasks.task_map import TaskMap

REPO = Path(__file__).resolve().parents[1]


def test_trainer_modules_define_no_loss():
    """A loss is a class named ``...Loss`` or a function named ``..._loss``; trainers import them."""
    found = []
    for module in sorted((REPO / "trainers").glob("*.py")):
        for node in ast.parse(module.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Loss") or \
                    isinstance(node, ast.FunctionDef) and node.name.endswith("_loss"):
                found.append(f"{module.name}: {node.name}")
    assert not found, f"losses defined in trainer modules (move them to nnunet_ext/losses): {found}"


# --- MC-Net+: sharpening, mutual consistency, Dice ------------------------------------------------

def reference_sharpen(p: np.ndarray, temperature: float = 0.1) -> np.ndarray:
    out = np.empty_like(p)
    for index, value in np.ndenumerate(p):
        out[index] = value ** (1 / temperature) / (value ** (1 / temperature) + (1 - value) ** (1 / temperature))
    return out


def reference_consistency(probabilities: list[np.ndarray]) -> float:
    total = 0.0
    for i in range(len(probabilities)):
        for j in range(len(probabilities)):
            if i != j:
                total += float(np.mean((probabilities[i] - reference_sharpen(probabilities[j])) ** 2))
    return total


def random_probabilities(n: int, shape=(3, 2, 4, 5, 6), seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.softmax(2 * torch.randn(shape, generator=generator, dtype=torch.float64), 1) for _ in range(n)]


def test_sharpen_against_reference():
    p = random_probabilities(1)[0]
    np.testing.assert_allclose(sharpen(p).numpy(), reference_sharpen(p.numpy()), rtol=1e-10, atol=1e-12)
    assert sharpen(torch.tensor([0.5])).item() == 0.5 and sharpen(torch.tensor([0.6])).item() > 0.98


@pytest.mark.parametrize("n", [2, 3])
def test_consistency_against_a_loop_over_ordered_pairs(n):
    probabilities = random_probabilities(n, seed=n)
    ours = mutual_consistency_loss(probabilities).item()
    assert ours == pytest.approx(reference_consistency([p.numpy() for p in probabilities]), rel=1e-10)


def test_consistency_gradient_reaches_the_sharpened_side_too():
    """Nothing detached (official): the gradient equals that of the full formula, not of a stop-gradient one."""
    leaves = [p.clone().requires_grad_(True) for p in random_probabilities(3, seed=5)]
    mutual_consistency_loss(leaves).backward()
    ours = [leaf.grad.clone() for leaf in leaves]
    for detached in (False, True):
        copies = [p.detach().clone().requires_grad_(True) for p in leaves]
        total = sum(torch.mean((copies[i] - (sharpen(copies[j]).detach() if detached else sharpen(copies[j]))) ** 2)
                    for i in range(3) for j in range(3) if i != j)
        total.backward()
        same = all(torch.allclose(a, c.grad) for a, c in zip(ours, copies))
        assert same != detached


def reference_binary_dice_loss(probabilities: torch.Tensor, label: torch.Tensor) -> float:
    """The official Binary_dice_loss: 1 - (2 sum(p y) + eps) / (sum p + sum y + eps) over the whole batch."""
    p, y = probabilities[:, 1].double(), (label[:, 0] == 1).double()
    return float(1 - (2 * (p * y).sum() + 1e-8) / (p.sum() + y.sum() + 1e-8))


def test_dice_is_the_official_binary_dice_for_two_classes_and_masks_ignored_voxels():
    torch.manual_seed(1)
    logits, label = torch.randn(2, 2, 4, 6, 6), torch.randint(0, 2, (2, 1, 4, 6, 6))
    ours = MCNetDiceLoss()(logits, label).item()
    assert ours == pytest.approx(reference_binary_dice_loss(torch.softmax(logits, 1), label), abs=1e-6)
    with_ignore = label.clone()
    with_ignore[:, :, :2] = 2
    masked = MCNetDiceLoss(ignore_label=2)(logits, with_ignore).item()
    kept = torch.softmax(logits, 1)[:, :, 2:]
    assert masked == pytest.approx(reference_binary_dice_loss(kept, label[:, :, 2:]), abs=1e-6)


# --- LeFeD: official Dice, one pass's loss ------------------------------------------------------

def reference_dice(probabilities: torch.Tensor, labels: torch.Tensor, ignore: int | None = None) -> torch.Tensor:
    """The official binary dice_loss, written out per class with numpy-style sums, mean over foreground."""
    values = []
    keep = torch.ones_like(labels, dtype=torch.bool) if ignore is None else labels != ignore
    for c in range(1, probabilities.shape[1]):
        p = probabilities[:, c][keep[:, 0]]
        t = (labels[:, 0][keep[:, 0]] == c).double()
        values.append(1 - (2 * (p * t).sum() + 1e-5) / ((p ** 2).sum() + (t ** 2).sum() + 1e-5))
    return sum(values) / len(values)


@pytest.mark.parametrize("classes, ignore", [(2, None), (3, 3)])
def test_loss_is_dice_both_decoders_plus_weighted_side_dice_plus_mse(classes, ignore):
    torch.manual_seed(1)
    shape = (4, classes, 4, 6, 6)
    outputs = LeFeDOutput(torch.randn(shape), torch.randn(shape), [torch.randn(shape) for _ in range(5)], [], [])
    labels = torch.randint(0, classes + (ignore is not None), (2, 1, *shape[2:])).float()
    loss = LeFeDLoss(ignore_label=ignore)
    soft = [torch.softmax(t.double(), 1) for t in (outputs.logits1, outputs.logits2, *outputs.side)]
    expected = (reference_dice(soft[0][:2], labels, ignore) + reference_dice(soft[1][:2], labels, ignore)
                + sum(w * reference_dice(s[:2], labels, ignore) for w, s in zip((0.8, 0.6, 0.4, 0.2, 0.1), soft[2:]))
                + ((soft[0] - soft[1]) ** 2).mean())  # consistency on all four patches, weight 1
    assert float(loss(outputs, labels, 2)) == pytest.approx(float(expected), rel=1e-5)
    terms = loss.terms(outputs, labels, 2)
    assert float(terms["consistency"]) == pytest.approx(float(((soft[0] - soft[1]) ** 2).mean()), rel=1e-5)
    with pytest.raises(TypeError, match="full-resolution target"):
        loss(outputs, [labels], 2)


def test_official_dice_is_zero_for_a_perfect_prediction_and_one_when_disjoint():
    labels = torch.tensor([0, 1, 1, 0]).view(1, 1, 4)
    perfect = torch.stack([1 - labels[:, 0], labels[:, 0]], 1).float()
    assert float(official_dice_loss(perfect, labels)) == pytest.approx(0, abs=1e-6)
    assert float(official_dice_loss(perfect.flip(1), labels)) == pytest.approx(1, abs=1e-5)


# --- DoDNet / TransDoDNet: Dice + BCE on the task's sigmoid channels ----------------------------

def _task(name: str, task_id: int, labels: dict[str, int], channels: int = 1) -> dict:
    labels = {"background": 0, **labels}
    return {name: {"task_id": task_id, "source": f"Dataset9{task_id}_{name}", "case_prefix": f"T{task_id:02d}{name}_",
                   "num_channels": channels, "channel_names": {str(c): "CT" for c in range(channels)},
                   "labels": labels, "to_source": {str(v): i for i, v in enumerate(labels.values())}}}


def synthetic_map() -> TaskMap:
    """The merged synthetic family: liver+kidney, liver+spleen+lesion, kidney+spleen."""
    return TaskMap.from_dict({**_task("LiverKidney", 0, {"liver": 1, "kidney": 2}),
                              **_task("LiverSpleenLesion", 1, {"liver": 1, "spleen": 3, "lesion": 4}, 2),
                              **_task("KidneySpleen", 2, {"kidney": 2, "spleen": 3}, 4)})


def test_loss_is_official_dice_plus_bce_on_the_tasks_channels_only():
    task_map = synthetic_map()
    coding = SigmoidLabelCoding(task_map)
    loss = DoDNetLoss(coding)
    loss.set_task(0)  # liver + kidney: channels 0, 1 annotated, channel 2 not
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 1, 4, 4, 4))
    value = loss(logits, target)
    value.backward()
    assert logits.grad[:, 2].abs().sum() == 0 and logits.grad[:, :2].abs().sum() > 0
    terms = []
    for k, label in enumerate((1, 2)):  # official DiceLoss4MOTS + CELoss4MOTS, written out
        t = (target[:, 0] == label).float().flatten(1)
        z = logits[:, k].detach().flatten(1)
        p = torch.sigmoid(z)
        dice = 1 - 2 * (p * t).sum(1) / (p.sum(1) + t.sum(1) + 1)
        bce = F.binary_cross_entropy_with_logits(z, t, reduction="none").mean(1)
        terms.append(dice.mean() + bce.mean())
    torch.testing.assert_close(value.detach(), torch.stack(terms).mean())


def test_loss_skips_ignore_voxels():
    loss = DoDNetLoss(SigmoidLabelCoding(synthetic_map()), ignore_value=9)
    logits = torch.zeros(1, 3, 2, 2, 2, requires_grad=True)
    target = torch.ones(1, 1, 2, 2, 2, dtype=torch.long)
    target[..., 0] = 9
    loss(logits, target).backward()
    assert logits.grad[..., 0].abs().sum() == 0 and logits.grad[..., 1].abs().sum() > 0
