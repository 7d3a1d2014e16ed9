"""PEP 517 / PEP 660 build backend: setuptools' own, plus the start-up file at the top of each wheel.

nnU-Net finds external trainers only through the ``nnUNet_extTrainer`` search path. The one-line
``nnunet_ext.pth`` file, placed at the top of site-packages, appends our discovery folder to that
variable at interpreter start-up (see ``nnunet_ext/_startup.py``), so ``nnUNetv2_train -tr
CoTrTrainer`` works right after ``pip install``. Setuptools has no declarative way to put a file
there for both regular and editable wheels (``data-files`` lands under sys.prefix; editable wheels
carry only setuptools' own mapping files). So this backend lets setuptools build the wheel and then
adds the file to it, using only standard interfaces: the PEP 517/660 hooks (``build_wheel``,
``build_editable``) and the wheel format (a zip file whose ``RECORD`` lists every file with its
SHA-256 and size, PEP 376/427). Every other hook is setuptools' unchanged. Metadata lives in
pyproject.toml.
"""
from __future__ import annotations

import base64
import hashlib
import os
import tempfile
import zipfile
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403 - every hook we do not change

PTH_NAME = "nnunet_ext.pth"
PTH_SOURCE = Path(__file__).resolve().parents[1] / "nnunet_ext" / PTH_NAME


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode("ascii")
    return f"{name},sha256={digest},{len(data)}"


def add_startup_file(wheel: Path) -> None:
    """Rewrite ``wheel`` with ``nnunet_ext.pth`` at its top level and a matching RECORD entry."""
    data = PTH_SOURCE.read_bytes()
    with zipfile.ZipFile(wheel) as source:
        records = [info for info in source.infolist() if info.filename.endswith(".dist-info/RECORD")]
        if len(records) != 1:
            raise RuntimeError(f"{wheel}: expected one .dist-info/RECORD, found {len(records)}")
        record_info = records[0]
        record = source.read(record_info).decode("utf-8").splitlines()
        record = [line for line in record if line and not line.startswith(PTH_NAME + ",")]
        record.insert(len(record) - 1, _record_line(PTH_NAME, data))  # RECORD's own line stays last
        handle, temporary = tempfile.mkstemp(dir=wheel.parent, suffix=".whl")
        os.close(handle)
        try:
            with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as target:
                for info in source.infolist():
                    if info.filename == PTH_NAME:
                        continue
                    if info is record_info:
                        pth = zipfile.ZipInfo(PTH_NAME, date_time=info.date_time)
                        pth.external_attr = 0o644 << 16
                        target.writestr(pth, data, compress_type=zipfile.ZIP_DEFLATED)
                        target.writestr(info, "\n".join(record) + "\n", compress_type=zipfile.ZIP_DEFLATED)
                    else:
                        target.writestr(info, source.read(info), compress_type=info.compress_type)
            os.replace(temporary, wheel)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)
    add_startup_file(Path(wheel_directory) / name)
    return name


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    # The editable wheel holds setuptools' __editable__*.pth, which sorts before ours, so the package
    # is importable when our line runs.
    name = _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
    add_startup_file(Path(wheel_directory) / name)
    return name
