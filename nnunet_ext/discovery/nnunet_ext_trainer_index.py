"""Re-export of every nnunet-ext trainer, for nnU-Net's trainer lookup (``nnUNet_extTrainer``).

nnU-Net imports this file as a top-level module while searching our discovery folder. The
classes it finds here live in ``nnunet_ext.trainers.<method>``, so they are imported once, under
their package path, and pickle (checkpoints, spawned workers). Keep this folder free of other
modules: nnU-Net imports everything in it.
"""
from nnunet_ext.trainers import *  # noqa: F401,F403
