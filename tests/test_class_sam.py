"""ClassSAM (SurgicalSAM-style SAM with class prompts): network, SAM checkpoints, losses and the
embedding cache, on a tiny random SAM built from segment_anything's own modules.

The trainer and the stock pipeline are in test_class_sam_trainer.py.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

from class_sam_support import write_tiny_sam_checkpoint
from nnunet_ext.architectures.class_sam import (SAM_PIXEL_MEAN, SAM_PIXEL_STD, ClassPromptEncoder, ClassSAM,
                                                SamCheckpointError, build_sam, load_sam_checkpoint, paper_class_sam,
                                                sam_frame)
from nnunet_ext.embedding_cache import (CachedBatches, EmbeddingCache, EmbeddingCacheError, array_digest, build,
                                        case_tiles, count_items, module_digest, slice_tiles, tile_starts)
from nnunet_ext.errors import UserFacingError
from nnunet_ext.losses.class_prompt import (ClassSAMLoss, class_embeddings, class_masks, contrastive_prototype_loss,
                                            sigmoid_dice)

METHODS_TRAINABLE = 4_650_000  # SurgicalSAM paper: "about 4.65 M trainable parameters"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks: one thread avoids OpenMP spin-waiting on a busy 2-core machine (100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(input_channels: int = 1, num_classes: int = 5, seed: int = 0, **kwargs) -> ClassSAM:
    torch.manual_seed(seed)
    return ClassSAM(input_channels=input_channels, num_classes=num_classes, sam_model_type="tiny", **kwargs)


# ---------------------------------------------------------------------------------------------
# network
# ---------------------------------------------------------------------------------------------
def test_paper_configuration_trainable_parameters_match_methods_md():
    """Counted on the meta device (no 2.5 GB allocation): the trainable part is SurgicalSAM's minus the
    IoU head, which the official loss never reaches (it is in the official optimiser but never changes)."""
    with torch.device("meta"):
        network = paper_class_sam()
    counts = network.parameter_counts()
    iou_head = sum(p.numel() for p in network.mask_decoder.iou_prediction_head.parameters())
    encoder = sum(p.numel() for p in network.image_encoder.parameters())
    assert counts["trainable"] == 4_518_114
    assert iou_head == 132_612
    official_optimiser = counts["trainable"] + iou_head  # prototypes + prompt encoder + whole mask decoder
    assert official_optimiser == 4_650_726
    assert abs(official_optimiser - METHODS_TRAINABLE) <= 0.001 * METHODS_TRAINABLE
    assert abs(counts["trainable"] - METHODS_TRAINABLE) <= 0.03 * METHODS_TRAINABLE  # the IoU head's 2.85 %
    assert encoder == 637_026_048  # SAM ViT-H, as segment_anything builds it
    assert counts["total"] == 641_677_798
    assert counts["frozen"] == encoder + iou_head + 2 * 2 * 256  # + the positive/negative class marks


@pytest.mark.parametrize("channels,shape", [(1, (40, 30)), (3, (96, 80)), (2, (64, 64))],
                         ids=["upscaled", "shrunk", "exact"])
def test_logits_have_nnunet_shape_with_a_zero_background(channels, shape):
    network = tiny(channels).eval()
    with torch.no_grad():
        logits = network(torch.randn(2, channels, *shape))
    assert logits.shape == (2, 5, *shape)
    assert torch.equal(logits[:, 0], torch.zeros_like(logits[:, 0]))
    # argmax = background exactly where no class's sigmoid passes 0.5 (SurgicalSAM's threshold 0)
    foreground = logits[:, 1:]
    expected = torch.where(foreground.max(1).values > 0, foreground.argmax(1) + 1, torch.zeros_like(foreground[:, 0],
                                                                                                  dtype=torch.long))
    assert torch.equal(logits.argmax(1), expected)


def test_each_class_channel_is_the_decoder_run_for_that_class_alone():
    """The batched decoding (over images and classes) equals SAM's decoder called per image and class
    with that class's prompts, postprocessed as segment_anything's Sam.postprocess_masks."""
    network = tiny(seed=1).eval()
    x = torch.randn(2, 1, 40, 30)
    sam = build_sam("tiny")
    with torch.no_grad():
        logits = network(x)
        embeddings = network.encode(x)
        dense, sparse = network.prompt_encoder(embeddings)
        position = network.pe_layer(embeddings.shape[-2:]).unsqueeze(0)
        for b in range(2):
            for k in range(4):
                low_res, _ = network.mask_decoder(image_embeddings=embeddings[b:b + 1], image_pe=position,
                                                  sparse_prompt_embeddings=sparse[b, k:k + 1],
                                                  dense_prompt_embeddings=dense[b, k:k + 1], multimask_output=False)
                expected = sam.postprocess_masks(low_res, sam_frame(40, 30, 64), (40, 30))[0, 0]
                torch.testing.assert_close(logits[b, k + 1], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits[:, 1], logits[:, 2])  # the prompts differ per class


def test_class_prompt_encoder_follows_the_official_formula():
    """Against a per-class loop of the official Prototype_Prompt_Encoder: activated feature f + f * (f . p_k),
    dense 1x1-conv MLP, sparse MLP across positions, the prompted class's tokens positive, the others negative."""
    torch.manual_seed(0)
    encoder = ClassPromptEncoder(num_classes=3, embed_dim=8, embedding_size=4, num_tokens=2, hidden_dim_dense=6,
                                 hidden_dim_sparse=5)
    torch.nn.init.normal_(encoder.positive.weight)
    torch.nn.init.normal_(encoder.negative.weight)
    embeddings = torch.randn(2, 8, 4, 4)
    dense, sparse = encoder(embeddings)
    assert dense.shape == (2, 3, 8, 4, 4) and sparse.shape == (2, 3, 3 * 2, 8)
    for b in range(2):
        features = embeddings[b].flatten(1).t()  # (16, 8)
        tokens = []
        for k in range(3):
            activated = features + features * (features @ encoder.prototypes.weight[k]).unsqueeze(-1)
            torch.testing.assert_close(dense[b, k], encoder.dense(activated.t().reshape(1, 8, 4, 4))[0])
            tokens.append(encoder.sparse(activated.unsqueeze(0))[0])  # (2, 8)
        for run in range(3):
            expected = torch.cat([tokens[k] + (encoder.positive.weight if k == run else encoder.negative.weight)
                                  for k in range(3)])
            torch.testing.assert_close(sparse[b, run], expected)


def test_sam_input_is_a_fixed_intensity_map_then_sams_geometry():
    network = tiny(3, channel_indices=(2, 0, 0))
    x = torch.zeros(1, 3, 40, 20)
    x[0, 2, 0, 0], x[0, 0, 0, 0] = -5.0, 3.0  # beyond the range clamps; +3 SD is 255
    image, frame = network.to_sam_input(x)
    assert image.shape == (1, 3, 64, 64) and frame == sam_frame(40, 20, 64) == \
        ResizeLongestSide.get_preprocess_shape(40, 20, 64) == (64, 32)
    assert torch.equal(image[:, :, :, frame[1]:], torch.zeros_like(image[:, :, :, frame[1]:]))  # padded right
    mean, std = torch.tensor(SAM_PIXEL_MEAN), torch.tensor(SAM_PIXEL_STD)
    # away from the two changed pixels, z = 0 is mid grey in every channel
    torch.testing.assert_close(image[0, :, 40, 20], (127.5 - mean) / std)
    same, _ = network.to_sam_input(torch.zeros(1, 3, 40, 20))
    exact = tiny(3, channel_indices=(2, 0, 0))
    corner, _ = exact.to_sam_input(torch.tensor([-5.0, 0, 3.0]).view(1, 3, 1, 1).expand(1, 3, 64, 64).clone())
    torch.testing.assert_close(corner[0, :, 0, 0], (torch.tensor([255.0, 0.0, 0.0]) - mean) / std)
    # the map does not depend on the patch's content: far from the changed corner the images are equal
    torch.testing.assert_close(image[..., 20:, 10:frame[1]], same[..., 20:, 10:frame[1]])


def test_frozen_parts_get_no_gradient_and_the_tunable_parts_do():
    network = tiny()
    x, target = torch.randn(2, 1, 40, 40), torch.randint(0, 5, (2, 1, 40, 40))
    logits, embeddings, prototypes = network(x, return_embeddings=True)
    assert not embeddings.requires_grad  # the encoder ran without an autograd graph
    ClassSAMLoss(image_size=64)(logits, target, embeddings, prototypes).backward()
    frozen = {n for n, p in network.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in network.named_parameters()
                      if n.startswith(("image_encoder.", "mask_decoder.iou_prediction_head.",
                                       "prompt_encoder.positive", "prompt_encoder.negative"))}
    assert all(p.grad is None for n, p in network.named_parameters() if n in frozen)
    for name in ("prompt_encoder.prototypes.weight", "prompt_encoder.dense.0.weight", "prompt_encoder.sparse.0.weight",
                 "mask_decoder.transformer.layers.0.self_attn.q_proj.weight", "mask_decoder.output_upscaling.0.weight"):
        grad = dict(network.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_deep_supervision_switch_is_accepted_and_changes_nothing():
    network = tiny().eval()
    x = torch.randn(1, 1, 40, 40)
    with torch.no_grad():
        reference = network(x)
        for enabled in (True, False):
            network.decoder.deep_supervision = enabled  # what nnU-Net's set_deep_supervision_enabled does
            output = network(x)
            assert isinstance(output, torch.Tensor) and torch.equal(output, reference)


def test_forward_from_embeddings_equals_the_live_forward():
    network = tiny().eval()
    x = torch.randn(2, 1, 40, 30)
    with torch.no_grad():
        torch.testing.assert_close(network(image_embeddings=network.encode(x), output_size=(40, 30)), network(x))
    with pytest.raises(ValueError, match="output_size"):
        network(image_embeddings=torch.zeros(1, 32, 4, 4))


def test_bad_arguments_are_refused():
    with pytest.raises(UserFacingError, match="use one of vit_h, vit_l, vit_b, tiny"):
        ClassSAM(1, 3, sam_model_type="vit_x")
    with pytest.raises(ValueError, match="channel_indices"):
        ClassSAM(1, 3, sam_model_type="tiny", channel_indices=(0, 1, 2))


# ---------------------------------------------------------------------------------------------
# SAM checkpoints
# ---------------------------------------------------------------------------------------------
def test_good_checkpoint_loads_every_sam_part(tmp_path):
    path = write_tiny_sam_checkpoint(tmp_path / "sam_tiny.pth", seed=3)
    sam_state = torch.load(path, weights_only=True)
    network = tiny(seed=0)
    prototypes = network.prototypes.detach().clone()
    assert load_sam_checkpoint(network, path) == {"path": str(path.resolve()), "model_type": "tiny"}
    ours = network.state_dict()
    for key, value in sam_state.items():
        if key.startswith(("image_encoder.", "mask_decoder.")):
            assert torch.equal(ours[key], value), key
    assert torch.equal(network.pe_layer.positional_encoding_gaussian_matrix,
                       sam_state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"])
    assert torch.equal(network.prompt_encoder.positive.weight,
                       sam_state["prompt_encoder.point_embeddings.1.weight"].expand(2, -1))
    assert torch.equal(network.prompt_encoder.negative.weight,
                       sam_state["prompt_encoder.point_embeddings.0.weight"].expand(2, -1))
    assert torch.equal(network.prototypes, prototypes)  # the class prompt encoder keeps its own initialisation
    torch.save({"model": sam_state}, tmp_path / "nested.pth")  # fine-tuned SAM variants nest their weights
    load_sam_checkpoint(tiny(seed=5), tmp_path / "nested.pth")


def test_checkpoint_of_another_model_type_names_the_type_it_looks_like(tmp_path):
    like_vit_b = {f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(12)}
    like_vit_b["image_encoder.patch_embed.proj.weight"] = torch.zeros(768, 1, 1, 1)
    torch.save(like_vit_b, tmp_path / "sam_vit_b.pth")
    with pytest.raises(SamCheckpointError, match=r"sam_vit_b.pth looks like vit_b, but the network is tiny.*"
                                                  r"NNUNET_EXT_SAM_MODEL_TYPE=vit_b"):
        load_sam_checkpoint(tiny(), tmp_path / "sam_vit_b.pth")
    state = torch.load(write_tiny_sam_checkpoint(tmp_path / "tiny.pth"), weights_only=True)
    state["image_encoder.pos_embed"] = torch.zeros(1, 8, 8, 32)  # trained at another input size
    del state["mask_decoder.iou_token.weight"]
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(SamCheckpointError, match=r"odd.pth looks like tiny.*image_encoder.: 0 missing, 1 of another "
                                                  r"shape.*pos_embed.*mask_decoder.: 1 missing"):
        load_sam_checkpoint(tiny(), tmp_path / "odd.pth")


def test_missing_corrupt_and_foreign_files_give_clear_errors(tmp_path):
    with pytest.raises(SamCheckpointError, match="does not exist. Set NNUNET_EXT_SAM_CHECKPOINT"):
        load_sam_checkpoint(tiny(), tmp_path / "nowhere.pth")
    good = write_tiny_sam_checkpoint(tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(good[: len(good) // 2])
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    for name in ("truncated.pth", "garbage.pth"):
        with pytest.raises(SamCheckpointError, match=f"{name} could not be read.*corrupt"):
            load_sam_checkpoint(tiny(), tmp_path / name)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other_model.pth")
    with pytest.raises(SamCheckpointError, match="other_model.pth is not a SAM checkpoint"):
        load_sam_checkpoint(tiny(), tmp_path / "other_model.pth")


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------
def test_class_masks_and_the_official_dice():
    target = torch.tensor([[[[0, 1], [2, 9]]]])
    masks, valid = class_masks(target, num_classes=2, ignore_label=9)
    assert masks.tolist() == [[[[0, 1], [0, 0]], [[0, 0], [1, 0]]]] and valid.tolist() == [[[[1, 1], [1, 0]]]]
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 5.0]], [[1.0, 0.0], [3.0, 0.0]]]])
    p = torch.sigmoid(logits) * valid
    expected = 1 - 2 * (p * masks).sum((2, 3)) / ((p ** 2).sum((2, 3)) + 1e-3 + (masks ** 2).sum((2, 3)) + 1e-3)
    torch.testing.assert_close(sigmoid_dice(logits, masks, valid), expected)


def reference_ntxent(prototypes, embeddings, labels, temperature):
    """NT-Xent as pytorch-metric-learning computes it with ref_emb: per positive (prototype, embedding) pair,
    -log(e^s_pos / (e^s_pos + sum over the anchor's negatives e^s_neg)), mean over the pairs."""
    losses = []
    for k, prototype in enumerate(prototypes):
        s = [float(F.cosine_similarity(prototype, e, dim=0)) / temperature for e in embeddings]
        negatives = [s[n] for n in range(len(s)) if labels[n] != k]
        for n in range(len(s)):
            if labels[n] == k:
                losses.append(-np.log(np.exp(s[n]) / (np.exp(s[n]) + sum(np.exp(v) for v in negatives))))
    return float(np.mean(losses))


def test_contrastive_prototype_loss_is_the_official_ntxent():
    torch.manual_seed(0)
    prototypes, embeddings = torch.randn(4, 6), torch.randn(5, 6)
    labels = torch.tensor([0, 2, 2, 3, 0])
    ours = contrastive_prototype_loss(prototypes, embeddings, labels, temperature=0.5)
    assert ours.item() == pytest.approx(reference_ntxent(prototypes, embeddings, labels, 0.5), rel=1e-5)
    # only one class present: no negatives, no loss (as pytorch-metric-learning); no pairs at all: 0
    assert contrastive_prototype_loss(prototypes, embeddings[:2], torch.tensor([1, 1])).item() == 0.0
    assert contrastive_prototype_loss(prototypes, embeddings[:0], labels[:0]).item() == 0.0


def test_class_embeddings_average_the_cells_a_class_covers():
    embeddings = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    masks = torch.zeros(1, 3, 8, 8)  # an 8x8 patch fills the 64 px frame: 2 px per embedding cell
    masks[0, 0, :2, :2] = 1  # class 1: cell (0, 0)
    masks[0, 2, 4:, 6:] = 1  # class 3: cells (2, 3) and (3, 3); class 2 absent
    means, labels = class_embeddings(embeddings, masks, image_size=64)
    assert labels.tolist() == [0, 2]
    torch.testing.assert_close(means, torch.tensor([[0.0, 16.0], [13.0, 29.0]]))


def test_segmentation_loss_trains_absent_classes_and_skips_ignored_pixels():
    loss = ClassSAMLoss(image_size=64, ignore_label=3)
    target = torch.zeros(1, 1, 8, 8)
    target[..., :4, :4] = 1
    logits = torch.zeros(1, 4, 8, 8, requires_grad=True)  # classes 1 and 2 (absent); 3 is the ignore label
    loss(logits, target).backward()
    assert logits.grad[0, 2].abs().sum() > 0  # BCE pushes the absent class down
    ignored = target.clone()
    ignored[..., 6:, 6:] = 3
    changed = logits.detach().clone()
    changed[..., 6:, 6:] = 10.0
    assert loss(changed, ignored).item() == pytest.approx(loss(logits.detach(), ignored).item())


# ---------------------------------------------------------------------------------------------
# embedding cache
# ---------------------------------------------------------------------------------------------
def test_tiles_cover_each_slice_and_pad_like_nnunet():
    assert tile_starts(40, 40) == [0] and tile_starts(50, 40) == [0, 10] and tile_starts(100, 40) == [0, 30, 60]
    image, labels = np.arange(2 * 30 * 50, dtype=np.float32).reshape(2, 30, 50), np.full((30, 50), -1)
    tiles, targets = slice_tiles(image, labels, (40, 40))
    assert tiles.shape == (2, 2, 40, 40) and targets.shape == (2, 40, 40)
    assert (targets == 0).all()  # nnU-Net's -1 (outside the nonzero mask) and the padding are background
    np.testing.assert_array_equal(tiles[0, :, 5:35, :40], image[:, :, :40])  # centrally padded in y
    np.testing.assert_array_equal(tiles[1, :, 5:35, :], image[:, :, 10:])
    data, seg = np.zeros((1, 3, 30, 50), np.float32), np.zeros((1, 3, 30, 50), np.int16)
    seg[0, 1, 0, 0] = 2
    items, item_targets = case_tiles(data, seg, (40, 40), versions=4)
    assert len(items) == len(item_targets) == count_items(data.shape, (40, 40), 4) == 3 * 2 * 4
    # slice 1 holds items 8-15: its 2 tiles as they are, then left-right mirrored, up-down, both
    assert item_targets[8, 5, 0] == 2 and item_targets[10, 5, 39] == 2 and item_targets[12, 34, 0] == 2


def _fake_cases(count: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {f"case_{i}": (rng.normal(size=(1, 2, 8, 8)).astype(np.float32),
                          rng.integers(0, 3, size=(1, 2, 8, 8)).astype(np.int16)) for i in range(count)}


class CountingEncoder:
    """A stand-in image encoder (mean of each tile, broadcast) that counts the tiles it encodes."""

    def __init__(self):
        self.tiles = 0

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        self.tiles += len(tiles)
        return np.broadcast_to(tiles.mean(axis=(1, 2, 3))[:, None, None, None], (len(tiles), 4, 2, 2)).copy()


def _cache(folder, identity=None, **kwargs) -> EmbeddingCache:
    return EmbeddingCache(folder, identity or {"encoder": "a"}, (8, 8), (4, 2, 2), **kwargs)


def test_embedding_cache_miss_then_hit(tmp_path):
    cases, encoder = _fake_cases(), CountingEncoder()
    plan = build(_cache(tmp_path), cases.__getitem__, cases, encoder, batch_size=3, log=lambda *_: None)
    assert (plan.misses, plan.hits, encoder.tiles) == (list(cases), [], 3 * 2)
    embeddings, targets, foreground = _cache(tmp_path).read_case("case_1")
    data, seg = cases["case_1"]
    np.testing.assert_allclose(embeddings[1, 0, 0, 0], data[:, 1].mean(), rtol=1e-3)  # float16 on disk
    np.testing.assert_array_equal(targets, seg[0])
    assert foreground == [z for z in range(2) if (seg[0, z] > 0).any()]
    plan = build(_cache(tmp_path), cases.__getitem__, cases, encoder, batch_size=3, log=lambda *_: None)
    assert (plan.hits, plan.misses, encoder.tiles) == (list(cases), [], 6)  # nothing encoded again
    more = {**cases, **{"case_new": _fake_cases(1, seed=9)["case_0"]}}
    plan = build(_cache(tmp_path), more.__getitem__, more, encoder, batch_size=3, log=lambda *_: None)
    assert (plan.misses, encoder.tiles) == (["case_new"], 8)


def test_embedding_cache_refuses_stale_data_and_rebuilds_only_on_request(tmp_path):
    cases, encoder = _fake_cases(), CountingEncoder()
    build(_cache(tmp_path), cases.__getitem__, cases, encoder, batch_size=4, log=lambda *_: None)
    (tmp_path / "notes.txt").write_text("the user's own file")
    changed = dict(cases, case_2=(cases["case_2"][0] + 1, cases["case_2"][1]))  # preprocessed again
    with pytest.raises(EmbeddingCacheError, match=r"stale: the preprocessed data of 1 case\(s\) changed.*case_2"):
        build(_cache(tmp_path), changed.__getitem__, changed, encoder, batch_size=4, log=lambda *_: None)
    assert encoder.tiles == 6
    plan = build(_cache(tmp_path, rebuild=True), changed.__getitem__, changed, encoder, batch_size=4,
                 log=lambda *_: None)
    assert (plan.stale, sorted(plan.hits), encoder.tiles) == (["case_2"], ["case_0", "case_1"], 8)
    assert json.loads((tmp_path / "case_2.json").read_text())["digest"] == array_digest(*changed["case_2"])

    other_encoder = {"encoder": "b"}  # another checkpoint, model type or input transform
    with pytest.raises(EmbeddingCacheError, match=r"stale: it was built for another encoder.*encoder: 'a' -> 'b'"):
        build(_cache(tmp_path, other_encoder), changed.__getitem__, changed, encoder, batch_size=4,
              log=lambda *_: None)
    plan = build(_cache(tmp_path, other_encoder, rebuild=True), changed.__getitem__, changed, encoder, batch_size=4,
                 log=lambda *_: None)
    assert (len(plan.misses), encoder.tiles) == (3, 14)
    assert (tmp_path / "notes.txt").read_text() == "the user's own file"  # only the cache's own files go


def test_embedding_cache_of_one_convention_is_not_reused_under_the_other(tmp_path):
    """Official and default preprocessing give other embeddings of one patch: the cache identity (the
    trainer's ``embedding_identity``) names the conventions, so a cache built under one is stale under the
    other (the same encoder weights otherwise)."""
    from nnunet_ext.trainers.class_sam import embedding_identity

    identities = {c: embedding_identity(tiny(3, 3, conventions=c)) for c in ("default", "official")}
    assert [k for k in identities["default"] if identities["default"][k] != identities["official"][k]] == \
        ["conventions"]
    cases, encoder = _fake_cases(), CountingEncoder()

    def run(conventions: str):
        return build(_cache(tmp_path, identities[conventions]), cases.__getitem__, cases, encoder, batch_size=4,
                     log=lambda *_: None)

    run("default")
    assert run("default").hits == list(cases)
    with pytest.raises(EmbeddingCacheError, match=r"stale: it was built for another encoder or input "
                                                  r"\(conventions: 'default' -> 'official'\)"):
        run("official")
    assert encoder.tiles == 6  # nothing encoded under the official conventions


def test_embedding_cache_size_limit_is_checked_before_encoding(tmp_path):
    cases, encoder = _fake_cases(), CountingEncoder()
    item_bytes = _cache(tmp_path).item_bytes
    assert item_bytes == 4 * 2 * 2 * 2 + 8 * 8 * 2  # float16 embedding + int16 labels
    with pytest.raises(EmbeddingCacheError, match="would need .* more than its limit"):
        build(_cache(tmp_path, max_bytes=5 * item_bytes, versions=1), cases.__getitem__, cases, encoder,
              batch_size=4, log=lambda *_: None)
    assert encoder.tiles == 0 and not list(tmp_path.iterdir())
    build(_cache(tmp_path, max_bytes=6 * item_bytes + 3 * 1024), cases.__getitem__, cases, encoder, batch_size=4,
          log=lambda *_: None)  # 6 items fit (+ the small json and npy headers)


def test_cached_batches_oversample_foreground_like_nnunet(tmp_path):
    cases = _fake_cases(2)
    cases["case_0"][1][:] = 0  # no foreground anywhere in case_0
    build(_cache(tmp_path), cases.__getitem__, cases, CountingEncoder(), batch_size=4, log=lambda *_: None)
    batches = CachedBatches(_cache(tmp_path), list(cases), batch_size=3, oversample_foreground_percent=0.33, seed=0)
    for _ in range(20):
        batch = next(batches)
        assert batch["embeddings"].shape == (3, 4, 2, 2) and batch["embeddings"].dtype == torch.float32
        assert batch["target"].shape == (3, 1, 8, 8)
        assert batch["keys"][-1][0] == "case_1" and batch["target"][-1].max() > 0  # the last third: foreground


def test_module_digest_changes_with_the_weights():
    network = tiny()
    before = module_digest(network.image_encoder)
    assert module_digest(tiny().image_encoder) == before  # same seed, same weights
    with torch.no_grad():
        network.image_encoder.neck[0].weight[0, 0] += 1e-3
    assert module_digest(network.image_encoder) != before
