"""The distribution: wheel layout, and a regular (non-editable) install found by nnU-Net."""
from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                    "-w", str(out), "-q"], check=True, capture_output=True, timeout=600)
    (built,) = out.glob("nnunet_ext-*.whl")
    return built


def test_wheel_maps_method_folders_into_our_namespace_and_ships_the_hook(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "nnunet_ext.pth" in names
    for expected in ("nnunet_ext/trainers/__init__.py", "nnunet_ext/trainers/base.py",
                     "nnunet_ext/architectures/__init__.py", "nnunet_ext/plans/__init__.py",
                     "nnunet_ext/discovery/nnunet_ext_trainer_index.py", "nnunet_ext/cli/main.py"):
        assert expected in names, expected
    top_level = {name.split("/")[0] for name in names}
    assert top_level <= {"nnunet_ext", "nnunet_ext.pth"} | {n for n in top_level if n.endswith(".dist-info")}, \
        top_level


def test_every_python_package_folder_is_listed_in_pyproject():
    """A subpackage missing from [tool.setuptools] packages would work editable but vanish from wheels."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {folder: package for package, folder in config["package-dir"].items()}
    found = set()
    for init in REPO.rglob("__init__.py"):
        folder = init.parent.relative_to(REPO)
        if folder.parts[0] in ("tests", "benchmarks", "build") or folder.parts[0].startswith("."):
            continue
        top = mapped.get(folder.parts[0], folder.parts[0])
        found.add(".".join((top, *folder.parts[1:])))
    assert found == set(config["packages"]), found ^ set(config["packages"])


def test_regular_wheel_install_is_discovered_from_a_plain_shell(wheel, tmp_path):
    """A non-editable install in a fresh venv: the .pth runs and nnU-Net finds the trainer."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    with zipfile.ZipFile(wheel) as archive:  # what pip does for a pure wheel, minus the metadata
        archive.extractall(site)
    # dependencies (torch, nnunetv2) from this test environment, appended after the venv's own
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    for folder in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / folder).mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           **{f: str(tmp_path / f) for f in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}}
    script = ("import contextlib, io, nnunet_ext\n"
              "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
              "with contextlib.redirect_stdout(io.StringIO()):\n"
              "    cls = find('nnUNetExtTrainer')\n"
              "print(nnunet_ext.__file__); print(cls.__module__)")
    result = subprocess.run([str(python), "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    module_file, module = result.stdout.split()
    assert module_file.startswith(str(site)), "the wheel's copy, not the editable checkout, must be used"
    assert module == "nnunet_ext.trainers.base"
