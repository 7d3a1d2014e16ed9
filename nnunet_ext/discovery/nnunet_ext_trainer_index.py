"""Every nnunet-ext trainer by class name, for nnU-Net's trainer lookup (``nnUNet_extTrainer``).

nnU-Net imports this file as a top-level module while searching our discovery folder and asks it
``hasattr(module, NAME)``. Importing it costs only the trainer registry (``nnunet_ext.registry``, no
torch); a registered name imports that one method's module (``nnunet_ext.trainers.<method>``, so
the class pickles under its package path: checkpoints, spawned workers); any other name is an
AttributeError, and nnU-Net keeps looking. Keep this folder free of other modules: nnU-Net imports
everything in it.
"""
from nnunet_ext.registry import trainer_paths as _trainer_paths


def __getattr__(name: str) -> type:
    if name not in _trainer_paths():
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    # by name: trainers/ is installed as nnunet_ext.trainers (package-dir), which type checkers do not follow
    return getattr(importlib.import_module("nnunet_ext.trainers"), name)
