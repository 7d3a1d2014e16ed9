"""All nnunet-ext trainers, importable by class name (installed as ``nnunet_ext.trainers``).

nnU-Net's lookup imports this (through ``nnunet_ext/discovery``) and takes the class by name. The
list comes from ``nnunet_ext.registry``. A method whose module fails to import is reported with a
warning and left out, so one broken optional dependency does not hide every other trainer.
"""
import warnings

from nnunet_ext.registry import import_object, trainer_paths

__all__ = []

for _name, _path in trainer_paths().items():
    try:
        globals()[_name] = import_object(_path)
    except Exception as _error:  # noqa: BLE001 - keep the other trainers discoverable
        warnings.warn(f"nnunet-ext: trainer {_name} ({_path}) could not be imported and is unavailable: "
                      f"{type(_error).__name__}: {_error}", RuntimeWarning, stacklevel=1)
    else:
        __all__.append(_name)
