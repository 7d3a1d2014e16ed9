"""Zip submissions (AMOS22: one zip holding ``results/amos_XXXX.nii.gz``): writing one and reading one back.

Writing goes through :mod:`nnunet_ext.atomic_io` (the zip appears whole or not at all). Reading never
trusts member names: only members named exactly ``<folder>/<case><extension>`` are extracted, into a
folder the caller owns, under the name the case gives; every other member is reported.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

from nnunet_ext import atomic_io
from nnunet_ext.challenges.definition import SubmissionFormat


def member_case(fmt: SubmissionFormat, name: str) -> str | None:
    """The case of a member named ``<archive_folder>/<case><extension>``, else None."""
    prefix = f"{fmt.archive_folder}/"
    if not name.startswith(prefix) or not name.endswith(fmt.extension):
        return None
    case = name[len(prefix):-len(fmt.extension)]
    return case if fmt.case_pattern.match(case) and "/" not in case else None


def write_archive(fmt: SubmissionFormat, folder: Path, target: Path) -> None:
    """Zip the submission files in ``folder`` as ``<archive_folder>/<name>`` into ``target``, atomically.

    Members are stored (the ``.nii.gz`` files are compressed already), sorted, with the folder entry first.
    """
    files = sorted(p for p in folder.iterdir() if p.is_file())

    def write(temporary: Path) -> None:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr(zipfile.ZipInfo(f"{fmt.archive_folder}/"), b"")
            for path in files:
                archive.write(path, f"{fmt.archive_folder}/{path.name}")

    atomic_io.write_with(target, write)


def is_submission_archive(fmt: SubmissionFormat, path: Path) -> bool:
    """Whether ``path`` is a zip of this format's members only (an earlier submission that may be replaced)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return all(name == f"{fmt.archive_folder}/" or member_case(fmt, name) for name in names)


def extract(fmt: SubmissionFormat, path: Path, into: Path) -> tuple[list[tuple[str, str]], int]:
    """Extract the well-named members of the zip ``path`` into ``into``; (problems by member, members read).

    A file that is not a zip, a member outside ``<archive_folder>/``, a member listed twice and a folder
    entry other than ``<archive_folder>/`` are problems; nothing but well-named members is written.
    """
    problems: list[tuple[str, str]] = []
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as error:
        return [(path.name, f"is not a zip archive ({error}); {fmt.title} takes one .zip holding "
                            f"{fmt.archive_folder}/{fmt.example()}")], 0
    seen: set[str] = set()
    with archive:
        names = archive.namelist()
        if f"{fmt.archive_folder}/" not in names and not any(member_case(fmt, n) for n in names):
            problems.append((path.name, f"holds no {fmt.archive_folder}/ folder; {fmt.title} reads the predictions "
                                        f"from {fmt.archive_folder}/{fmt.example()}"))
        for name in names:
            if name == f"{fmt.archive_folder}/":
                continue
            case = member_case(fmt, name)
            if case is None:
                problems.append((name, f"unexpected member; the zip may hold only {fmt.archive_folder}/"
                                       f"{fmt.example()} files"))
                continue
            if case in seen:
                problems.append((name, "listed twice in the zip"))
                continue
            seen.add(case)
            with archive.open(name) as source, open(into / f"{case}{fmt.extension}", "wb") as copy:
                while block := source.read(1 << 20):
                    copy.write(block)
    return problems, len(seen)

