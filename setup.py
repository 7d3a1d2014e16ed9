"""Build hook: ship the start-up file ``nnunet_ext.pth`` at the top of site-packages.

nnU-Net finds external trainers only through the ``nnUNet_extTrainer`` search path, read when a
trainer is looked up. The one-line ``.pth`` file appends our discovery folder to that variable at
interpreter start-up (see ``nnunet_ext/_startup.py``), so ``nnUNetv2_train -tr CoTrTrainer`` works
right after ``pip install`` with no manual set-up. Metadata lives in pyproject.toml.

Setuptools has no declarative way to put a file at the top of a wheel: ``data-files`` lands under
sys.prefix and PEP 660 editable wheels drop extra build_lib files. So the file is added by
``build_py`` for regular wheels and by ``editable_wheel`` (a private hook, hence the pinned
setuptools range in pyproject.toml) for ``pip install -e``.
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "nnunet_ext.pth"
PTH_SOURCE = Path(__file__).parent / "nnunet_ext" / PTH_NAME


class BuildPyWithStartupHook(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            self.copy_file(str(PTH_SOURCE), str(Path(self.build_lib) / PTH_NAME))


class EditableWheelWithStartupHook(editable_wheel):
    def _install_namespaces(self, installation_dir, pth_prefix):
        # Called with the folder whose content becomes the editable wheel; the file sorts after
        # setuptools' own __editable__*.pth, so our package is importable when it runs.
        super()._install_namespaces(installation_dir, pth_prefix)
        Path(installation_dir, PTH_NAME).write_bytes(PTH_SOURCE.read_bytes())


setup(cmdclass={"build_py": BuildPyWithStartupHook, "editable_wheel": EditableWheelWithStartupHook})
