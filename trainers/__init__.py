"""All nnunet-ext trainers, importable by class name (installed as ``nnunet_ext.trainers``).

Nothing is imported until a trainer is asked for: ``nnunet_ext.trainers.CoTrTrainer`` (or ``from
nnunet_ext.trainers import CoTrTrainer``) imports that method's module only, found through
``nnunet_ext.registry``; an import error of a method's module surfaces when that trainer is asked
for and hides no other. Each class lives in its method module (``nnunet_ext.trainers.cotr``), the
name pickles (checkpoints, spawned workers) refer to. nnU-Net's lookup reaches this package through
``nnunet_ext/discovery``.
"""
from __future__ import annotations

from nnunet_ext.registry import import_object, trainer_paths

__all__ = sorted(trainer_paths())


def __getattr__(name: str) -> type:
    path = trainer_paths().get(name)
    if path is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return import_object(path)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
