"""nnU-Net's DDP training path on CPU: 2 processes, gloo, our trainer, the harness dataset.

``nnUNetv2_train -num_gpus N`` cannot run without CUDA. nnU-Net 2.8 hard-codes it in five places:

1. ``run_training`` asserts ``device.type == 'cuda'`` when ``num_gpus > 1`` (run/run_training.py);
2. ``setup_ddp`` initialises the process group with ``"nccl"`` (run/run_training.py);
3. ``run_ddp`` calls ``torch.cuda.set_device`` (run/run_training.py);
4. ``nnUNetTrainer.__init__`` replaces the device by ``cuda:<rank>`` whenever a process group is
   initialised (and creates a CUDA ``GradScaler`` from it);
5. ``nnUNetTrainer.initialize`` wraps the network in ``DDP(network, device_ids=[rank])``, which
   torch refuses for a CPU module.

:func:`run_cpu_ddp` therefore does what ``run_ddp`` does, with these five replaced: it spawns
``world_size`` processes, initialises gloo, creates the trainer through nnU-Net's own
``get_trainer_from_args`` and ``maybe_load_checkpoint``, sets the device back to CPU (and the
gradient scaler to None, as nnU-Net has it on CPU), lets ``initialize`` wrap the network in a
CPU DDP (same call without ``device_ids``), then runs nnU-Net's ``run_training`` and
``perform_actual_validation``. Everything else is nnU-Net's DDP code: the per-rank batch size and
oversampling, ``SyncBatchNorm`` conversion, the DDP gradient all-reduce, the all-gathered losses
and Dice statistics, rank-0-only checkpoints and logging, the validation cases split over ranks,
and the barriers. Each rank writes what it saw to ``<report_dir>/rank_<r>.json``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

from nnunet_ext import atomic_io


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_ddp(module, device_ids=None, **kwargs):
    """nnU-Net's ``DDP(network, device_ids=[rank])`` for a CPU module (torch rejects device_ids there)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, **kwargs)


def _worker(rank: int, world_size: int, port: int, env: dict, trainer: str, dataset: str, configuration: str,
            fold: int, plans: str, continue_training: bool, report_dir: str) -> None:
    os.environ.update(env)  # before nnunetv2 is imported: it reads its folder variables at import
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from nnunet_ext import compat

        # hard-codes 4 and 5 (see the module docstring): a CPU device and a CPU-capable DDP wrapper
        nnunet_trainer = compat.trainer_for_ddp_test(dataset, configuration, fold, trainer, plans, continue_training,
                                                     _cpu_ddp, torch.device("cpu"))
        nnunet_trainer.run_training()
        network = nnunet_trainer.network
        parameters = torch.cat([p.detach().flatten() for p in network.parameters()])
        report = {
            "rank": rank, "world_size": dist.get_world_size(), "is_ddp": nnunet_trainer.is_ddp,
            "local_rank": nnunet_trainer.local_rank, "batch_size": nnunet_trainer.batch_size,
            "oversample_foreground_percent": nnunet_trainer.oversample_foreground_percent,
            "global_batch_size": nnunet_trainer.configuration_manager.batch_size,
            "network_is_ddp": type(network).__name__ == "DistributedDataParallel",
            "parameter_sum": float(parameters.double().sum()),
            "parameter_abs_sum": float(parameters.double().abs().sum()),
            "current_epoch": nnunet_trainer.current_epoch,
            "train_loss": float(nnunet_trainer.logger.get_value("train_losses", step=-1)),
            "output_folder": nnunet_trainer.output_folder,
        }
        if hasattr(nnunet_trainer, "method_state"):
            report["method_state"] = json.loads(json.dumps(nnunet_trainer.method_state(), default=repr))
        for name in ("labeled_batch_size_per_process", "unlabeled_batch_size_per_process"):
            if hasattr(nnunet_trainer, name):
                report[name] = getattr(nnunet_trainer, name)
        nnunet_trainer.perform_actual_validation(False)
        atomic_io.write_json(Path(report_dir, f"rank_{rank}.json"), report, indent=None)
    finally:
        dist.destroy_process_group()


def run_cpu_ddp(env: Mapping[str, str], trainer: str, dataset: int | str, report_dir: str | os.PathLike,
                configuration: str = "3d_fullres", fold: int = 0, plans: str = "nnUNetPlans",
                world_size: int = 2, continue_training: bool = False) -> list[dict]:
    """Train ``trainer`` in ``world_size`` CPU processes as ``nnUNetv2_train -num_gpus N`` would; one report per rank.

    ``env`` is the environment of the processes (nnU-Net folders, short schedule), e.g. ``NnUNetRoot.env()``.
    """
    import torch.multiprocessing as mp

    Path(report_dir).mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(world_size, _free_port(), dict(env), trainer, str(dataset), configuration, fold, plans,
                            continue_training, str(report_dir)), nprocs=world_size, join=True)
    return [json.loads(Path(report_dir, f"rank_{r}.json").read_text()) for r in range(world_size)]
