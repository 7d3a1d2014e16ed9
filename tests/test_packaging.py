"""The distribution: wheel layout, regular and editable installs found by nnU-Net, the metadata."""
from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


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
    # no test code: the tests' trainers, fixtures and small networks stay in tests/; nnunet_ext.testing is
    # the documented toolkit for users' own tests (harness, hostile-input checks, CPU DDP runs)
    testing = sorted(name for name in names if name.startswith("nnunet_ext/testing/"))
    assert testing == ["nnunet_ext/testing/__init__.py", "nnunet_ext/testing/ddp.py",
                       "nnunet_ext/testing/harness.py", "nnunet_ext/testing/hostile.py"], testing
    assert not [name for name in names if "/test_" in name or "control_trainer" in name or "small_networks" in name]


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


@pytest.fixture(scope="module")
def editable_wheel(tmp_path_factory) -> Path:
    """The wheel ``pip install -e .`` installs, built with the project's own backend (PEP 660 hook)."""
    out = tmp_path_factory.mktemp("editable")
    code = ("import sys; sys.path.insert(0, 'build_backend'); import nnunet_ext_backend as backend; "
            f"print(backend.build_editable({str(out)!r}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / result.stdout.strip().splitlines()[-1]


def _check_record(wheel: Path) -> list[str]:
    """Every file of the wheel is in RECORD with its SHA-256 and size (what installers rely on)."""
    with zipfile.ZipFile(wheel) as archive:
        (record,) = [n for n in archive.namelist() if n.endswith(".dist-info/RECORD")]
        entries = {}
        for line in archive.read(record).decode().splitlines():
            name, digest, size = line.rsplit(",", 2)
            entries[name] = (digest, size)
        for name in archive.namelist():
            if name == record:
                continue
            data = archive.read(name)
            expected = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert entries.get(name) == (expected, str(len(data))), name
        return archive.namelist()


def test_both_wheels_ship_the_startup_hook_with_a_valid_record(wheel, editable_wheel):
    assert "nnunet_ext.pth" in _check_record(wheel)
    names = _check_record(editable_wheel)
    assert "nnunet_ext.pth" in names
    editable_pth = [n for n in names if n.startswith("__editable__") and n.endswith(".pth")]
    assert editable_pth and all(n < "nnunet_ext.pth" for n in editable_pth)  # site reads .pth files sorted


def _plain_shell_lookup(site: Path, tmp_path: Path) -> tuple[str, str, str]:
    """In a fresh venv whose site-packages is ``site``: the .pth files run and nnU-Net finds a trainer."""
    # dependencies (torch, nnunetv2) from this test environment, appended after the venv's own
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    for folder in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / folder).mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           **{f: str(tmp_path / f) for f in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}}
    script = ("import contextlib, io, sys, nnunet_ext\n"
              "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
              "with contextlib.redirect_stdout(io.StringIO()):\n"
              "    cls = find('nnUNetExtTrainer')\n"
              "print(nnunet_ext.__file__); print(cls.__module__); print(sys.modules[cls.__module__].__file__)")
    result = subprocess.run([str(site.parents[2] / "bin" / "python"), "-c", script], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return tuple(result.stdout.split())


def _fresh_site_packages(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    return Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())


def test_regular_wheel_install_is_discovered_from_a_plain_shell(wheel, tmp_path):
    """A non-editable install in a fresh venv: the .pth runs and nnU-Net finds the trainer."""
    site = _fresh_site_packages(tmp_path)
    with zipfile.ZipFile(wheel) as archive:  # what pip does for a pure wheel, minus the metadata
        archive.extractall(site)
    module_file, module, _ = _plain_shell_lookup(site, tmp_path)
    assert module_file.startswith(str(site)), "the wheel's copy, not the editable checkout, must be used"
    assert module == "nnunet_ext.trainers.base"


def test_editable_install_is_discovered_from_a_plain_shell(editable_wheel, tmp_path):
    """``pip install -e .`` in a fresh venv: the trainers come from the checkout's top-level folders."""
    site = _fresh_site_packages(tmp_path)
    with zipfile.ZipFile(editable_wheel) as archive:
        archive.extractall(site)
    module_file, module, trainer_file = _plain_shell_lookup(site, tmp_path)
    assert module_file == str(REPO / "nnunet_ext" / "__init__.py")
    assert module == "nnunet_ext.trainers.base"
    assert trainer_file == str(REPO / "trainers" / "base.py")


# --- metadata -------------------------------------------------------------------------------------------

def _requirement_names(requirements: list[str]) -> dict[str, str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower(): r for r in requirements}


def test_metadata_license_urls_and_extras():
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"  # an SPDX expression, not the deprecated table
    assert (REPO / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert "urls" not in project or all("nnunet-ext/nnunet-ext" not in u for u in project["urls"].values())
    extras = project["optional-dependencies"]
    docs = {name for name in _requirement_names(extras["docs"])}
    assert {"mkdocs", "mkdocs-material", "mkdocstrings"} <= docs
    assert docs <= set(_requirement_names(extras["test"])), "CI installs .[test] only and builds the docs"
    assert "setup.py" not in {p.name for p in REPO.iterdir()}, "no build code that needs backend internals"
    assert not any("<" in r for r in PYPROJECT["build-system"]["requires"]), "no pin on the build backend"


def test_torch_range_is_nnunets_own():
    from importlib.metadata import requires

    ours = _requirement_names(PYPROJECT["project"]["dependencies"])["torch"]
    nnunet = [r for r in requires("nnunetv2") if r.lower().startswith("torch") and "extra" not in r][0]
    spec = lambda r: sorted(re.sub(r"^torch\s*", "", r).replace(" ", "").split(","))  # noqa: E731
    assert spec(ours) == spec(nnunet), (ours, nnunet)


IMPORT_NAMES = {"simpleitk": "SimpleITK", "segment-anything": "segment_anything",
                "dynamic-network-architectures": "dynamic_network_architectures", "nnunetv2": "nnunetv2"}


def test_every_declared_dependency_is_imported_by_the_package():
    sources = "\n".join(p.read_text(encoding="utf-8") for folder in ("nnunet_ext", "trainers", "architectures", "plans")
                        for p in (REPO / folder).rglob("*.py"))
    for name in _requirement_names(PYPROJECT["project"]["dependencies"]):
        module = IMPORT_NAMES.get(name, name.replace("-", "_"))
        assert re.search(rf"^\s*(import|from) {re.escape(module)}\b", sources, re.MULTILINE), \
            f"{name} is declared but never imported"


def test_citation_file_cites_nnunet_and_every_method():
    yaml = pytest.importorskip("yaml")
    from nnunet_ext.registry import METHODS

    citation = yaml.safe_load((REPO / "CITATION.cff").read_text(encoding="utf-8"))
    assert citation["cff-version"] == "1.2.0" and citation["license"] == "Apache-2.0"
    text = " ".join(str(r) for r in citation["references"]).lower()
    assert "10.1038/s41592-020-01008-z" in text  # nnU-Net
    for method in METHODS:
        if method.key in ("base", "universal"):
            continue
        assert method.title.split(" ")[0].lower().replace("-", "") in text.replace("-", ""), method.title


# --- segment-anything: the optional `sam` extra ----------------------------------------------------------

def test_segment_anything_is_the_sam_extra_and_the_test_extra_has_it():
    project = PYPROJECT["project"]
    assert "segment-anything" not in _requirement_names(project["dependencies"])
    extras = {name: _requirement_names(requirements) for name, requirements in project["optional-dependencies"].items()}
    assert set(extras["sam"]) == {"segment-anything"}
    assert extras["sam"]["segment-anything"] in extras["test"].values(), "the test extra runs the ClassSAM tests"


WITHOUT_SEGMENT_ANYTHING = """
import sys


class Blocker:  # segment_anything not installed
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'segment_anything':
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, Blocker())
import torch
from nnunet_ext.architectures.class_sam import build_sam
from nnunet_ext.errors import UserFacingError
from nnunet_ext.trainers.class_sam import ClassSAMTrainer

for build in (lambda: ClassSAMTrainer({}, '2d', 0, {}, torch.device('cpu')), lambda: build_sam('tiny')):
    try:
        build()
    except UserFacingError as error:
        print(error)
"""


def test_class_sam_without_segment_anything_says_how_to_install_it():
    """The modules import without the extra; creating the trainer or a SAM network is one line naming it."""
    result = subprocess.run([sys.executable, "-c", WITHOUT_SEGMENT_ANYTHING], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ['ClassSAMTrainer needs segment-anything: pip install "nnunet-ext[sam]"'] * 2
