"""Trainer discovery by nnU-Net's own lookup, from a plain shell, right after install."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest

from nnunet_ext import _startup, compat
from nnunet_ext.registry import trainer_paths

OUR_TRAINERS = sorted(trainer_paths())


def plain_shell_env(tmp_path, **extra) -> dict:
    """What a new login shell has: PATH, HOME and the three nnU-Net variables; nothing of ours."""
    env = {"PATH": os.path.dirname(sys.executable) + os.pathsep + "/usr/bin:/bin", "HOME": str(tmp_path)}
    for name in compat.NNUNET_PATH_VARIABLES:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        env[name] = str(folder)
    env.update(extra)
    return env


LOOKUP_SCRIPT = """
import contextlib, io, pickle, sys
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
for name in sys.argv[1:]:
    with contextlib.redirect_stdout(io.StringIO()):
        cls = recursive_find_trainer_class_by_name(name)
    assert pickle.loads(pickle.dumps(cls)) is cls
    print(name, cls.__module__)
"""


def test_stock_lookup_finds_every_trainer_from_a_plain_shell(tmp_path):
    result = subprocess.run([sys.executable, "-c", LOOKUP_SCRIPT, *OUR_TRAINERS], env=plain_shell_env(tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = dict(line.split() for line in result.stdout.splitlines())
    assert set(found) == set(OUR_TRAINERS)
    for name, module in found.items():
        assert module == trainer_paths()[name].split(":")[0], (name, module)


def test_user_value_of_ext_trainer_is_kept_and_searched_first(tmp_path):
    user_folder = tmp_path / "my_trainers"
    user_folder.mkdir()
    env = plain_shell_env(tmp_path, nnUNet_extTrainer=str(user_folder))
    result = subprocess.run([sys.executable, "-c", "import os; print(os.environ['nnUNet_extTrainer'])"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().split(os.pathsep) == [str(user_folder), _startup.DISCOVERY_FOLDER]


def test_start_up_hook_imports_neither_torch_nor_nnunet(tmp_path):
    script = "import sys, os; print(os.environ.get('nnUNet_extTrainer'), 'torch' in sys.modules, " \
             "'nnunetv2' in sys.modules, 'numpy' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], env=plain_shell_env(tmp_path), capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.split() == [_startup.DISCOVERY_FOLDER, "False", "False", "False"], result.stderr


def test_opt_out_variable_disables_the_hook(tmp_path):
    env = plain_shell_env(tmp_path, NNUNET_EXT_NO_AUTODISCOVERY="1")
    result = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('nnUNet_extTrainer'))"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "None"


def test_search_path_is_appended_once_and_normalised():
    ours = _startup.DISCOVERY_FOLDER
    assert _startup.search_path_with_discovery_folder(None) == ours
    assert _startup.search_path_with_discovery_folder("") == ours
    assert _startup.search_path_with_discovery_folder(f"/a{os.pathsep}/b") == os.pathsep.join(["/a", "/b", ours])
    already = os.pathsep.join(["/a", ours + os.sep])  # trailing separator: same folder
    assert _startup.search_path_with_discovery_folder(already) == already


def test_discovery_folder_holds_only_the_reexport_module():
    # nnU-Net imports every module in the folder on each lookup; anything else there is a hazard.
    entries = sorted(p for p in os.listdir(_startup.DISCOVERY_FOLDER) if p != "__pycache__")
    assert entries == ["nnunet_ext_trainer_index.py"]


@pytest.mark.parametrize("name", OUR_TRAINERS)
def test_trainer_names_do_not_collide_with_nnunet(name):
    """nnU-Net searches its own tree first: a name it ships would silently shadow ours."""
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    folder = compat.nnunet_trainer_folder()
    assert recursive_find_python_class(str(folder), name, "nnunetv2.training.nnUNetTrainer") is None


@pytest.mark.parametrize("name", OUR_TRAINERS)
def test_trainers_subclass_nnunet_trainer_with_unchanged_constructor(name):
    import inspect

    from nnunet_ext.registry import import_object

    cls = import_object(trainer_paths()[name])
    base = compat.base_trainer_class()
    assert issubclass(cls, base)
    # eval_str: a module with `from __future__ import annotations` writes the same types as strings
    assert inspect.signature(cls.__init__, eval_str=True) == inspect.signature(base.__init__, eval_str=True)
    assert pickle.loads(pickle.dumps(cls)) is cls


LAZY_LOOKUP_SCRIPT = """
import contextlib, io, sys
import nnunet_ext, nnunet_ext.trainers
print('torch' in sys.modules, 'segment_anything' in sys.modules)
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find
for name in sys.argv[1:]:
    with contextlib.redirect_stdout(io.StringIO()):
        cls = find(name)
    methods = sorted(m for m in sys.modules if m.startswith('nnunet_ext.trainers.'))
    print(cls.__module__, 'segment_anything' in sys.modules, ','.join(methods))
"""


def test_lookup_imports_only_the_asked_trainers_module_and_not_segment_anything(tmp_path):
    """The discovery module and ``nnunet_ext.trainers`` import a method's module only when its trainer is
    asked for: no torch for ``import nnunet_ext.trainers``, no segment_anything (the sam extra) until a
    SAM network is built, not even for ClassSAMTrainer's lookup."""
    result = subprocess.run([sys.executable, "-c", LAZY_LOOKUP_SCRIPT, "CoTrTrainer", "ClassSAMTrainer"],
                            env=plain_shell_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split("\n")
    assert lines[0] == "False False", "import nnunet_ext.trainers must stay light"
    assert lines[1] == "nnunet_ext.trainers.cotr False nnunet_ext.trainers.base,nnunet_ext.trainers.cotr"
    assert lines[2] == ("nnunet_ext.trainers.class_sam False "
                        "nnunet_ext.trainers.base,nnunet_ext.trainers.class_sam,nnunet_ext.trainers.cotr")


def test_the_trainers_package_exports_every_registered_trainer_by_name():
    import nnunet_ext.trainers as trainers

    assert trainers.__all__ == OUR_TRAINERS and set(OUR_TRAINERS) <= set(dir(trainers))
    assert trainers.CoTrTrainer.__module__ == "nnunet_ext.trainers.cotr"
    with pytest.raises(AttributeError, match="NoSuchTrainer"):
        trainers.NoSuchTrainer  # noqa: B018 - the lookup's hasattr needs an AttributeError
