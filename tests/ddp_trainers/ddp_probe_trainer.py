"""A trainer with method state, for the DDP tests: found through nnUNet_extTrainer (this folder).

It counts its optimiser steps in ``method_state``, like a ramp-up schedule would. Under DDP every
rank counts the same steps; rank 0 saves the count and every rank reads it back on ``--c``.
"""
from nnunet_ext.trainers.base import nnUNetExtTrainer


class DDPProbeTrainer(nnUNetExtTrainer):
    def train_step(self, batch: dict) -> dict:
        self.probe_steps = getattr(self, "probe_steps", 0) + 1
        return super().train_step(batch)

    def method_state(self) -> dict:
        return {"probe_steps": getattr(self, "probe_steps", 0)}

    def load_method_state(self, state: dict) -> None:
        self.probe_steps = int(state["probe_steps"])
