"""ClassSAM training iteration with and without the embedding cache, one run on one device.

Live: a batch of patches through SAM's frozen image encoder, the class prompts and the mask decoder,
Dice + BCE + contrastive loss, backward, Adam step (nnU-Net's data augmentation not included, which
only adds to the live time). Cached: the same batch size drawn from an :class:`EmbeddingCache`
(memory-mapped float16 files) through the decoder, loss, backward and step. Also reported: the
one-time cost of building the cache per tile, its size per tile, and trainable vs total parameters.
Random SAM weights (the ratio does not depend on them). Prints one JSON line.

Usage: ``python benchmarks/class_sam_cache.py [--model-type vit_b] [--batch 2] [--patch 256 256]
[--classes 7] [--steps 3] [--device cuda]``. On a CPU, ``--model-type tiny`` runs in seconds; vit_b
at SAM's 1024 input takes a few seconds per image.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch

from nnunet_ext.architectures.class_sam import ClassSAM
from nnunet_ext.embedding_cache import CachedBatches, EmbeddingCache, build
from nnunet_ext.losses.class_prompt import ClassSAMLoss


def synthetic_case(channels: int, slices: int, patch, classes: int, seed: int = 0):
    """A preprocessed-looking case: z-scored noise with blocky labels in every slice."""
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(channels, slices, *patch)).astype(np.float32)
    blocks = rng.integers(0, classes + 1, size=(1, slices, 4, 4))
    seg = np.kron(blocks, np.ones((1, 1, patch[0] // 4, patch[1] // 4), dtype=np.int64)).astype(np.int16)
    return data, seg


def timed(step, steps: int, device) -> float:
    times = []
    for index in range(steps + 1):  # the first is warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-type", default="vit_b", choices=["tiny", "vit_b", "vit_l", "vit_h"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--patch", type=int, nargs=2, default=[256, 256])
    parser.add_argument("--classes", type=int, default=7, help="foreground classes")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    network = ClassSAM(args.channels, args.classes + 1, sam_model_type=args.model_type).to(device).train()
    optimiser = torch.optim.Adam([p for p in network.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
    loss_function = ClassSAMLoss(network.spec.image_size)
    autocast = torch.autocast(device.type, enabled=device.type == "cuda")
    data, seg = synthetic_case(args.channels, args.batch * (args.steps + 1), args.patch, args.classes)

    def step(forward, target):
        """forward + loss under autocast (as nnU-Net's train_step), backward, Adam step."""
        with autocast:
            logits, embeddings, prototypes = forward()
            loss = loss_function(logits, target, embeddings, prototypes)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    x = torch.from_numpy(data[:, :args.batch].transpose(1, 0, 2, 3).copy()).to(device)
    target = torch.from_numpy(seg[:, :args.batch].transpose(1, 0, 2, 3).copy()).to(device)

    def live_step():
        step(lambda: network(x, return_embeddings=True), target)

    live = timed(live_step, args.steps, device)

    spec = network.spec
    with tempfile.TemporaryDirectory() as folder:
        cache = EmbeddingCache(folder, {"benchmark": args.model_type}, args.patch,
                               (spec.prompt_embed_dim, spec.embedding_size, spec.embedding_size), max_bytes=1e12)

        def encode(tiles):
            with torch.no_grad(), autocast:
                return network.encode(torch.from_numpy(tiles).to(device)).float().cpu().numpy()

        start = time.perf_counter()
        build(cache, lambda _: (data, seg), ["case"], encode, args.batch, log=lambda *_: None)
        build_per_tile = (time.perf_counter() - start) / data.shape[1]
        batches = CachedBatches(cache, ["case"], args.batch, seed=0)

        def cached_step():
            batch = next(batches)  # reading the memory-mapped cache is part of the cached iteration
            step(lambda: network(image_embeddings=batch["embeddings"].to(device), output_size=tuple(args.patch),
                                 return_embeddings=True), batch["target"].to(device))

        cached = timed(cached_step, args.steps, device)
    counts = network.parameter_counts()
    print(json.dumps({
        "model_type": args.model_type, "device": str(device), "batch": args.batch, "patch": args.patch,
        "classes": args.classes, "threads": torch.get_num_threads(),
        "seconds_per_iteration_live": round(live, 4), "seconds_per_iteration_cached": round(cached, 4),
        "speedup_live_over_cached": round(live / cached, 2),
        "cache_build_seconds_per_tile": round(build_per_tile, 4),
        "cache_mb_per_tile": round(cache.item_bytes / 1024 ** 2, 3),
        "parameters_trainable": counts["trainable"], "parameters_total": counts["total"],
        "trainable_share": round(counts["trainable"] / counts["total"], 5)}))


if __name__ == "__main__":
    main()
