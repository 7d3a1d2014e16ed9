"""The documentation: the site builds strictly, and what the pages say about commands matches the code.

* ``mkdocs build --strict`` of the real site (broken links or anchors, pages missing from the nav,
  docstrings mkdocstrings cannot read all fail it), and a tiny site that links a missing anchor of the
  generated CLI page, which must fail: the strict build can fail.
* The CLI reference is generated from the parsers (``docs/_hooks/reference.py``): every subcommand and
  option is on it. Every ``nnunet-ext`` command quoted in a page or the README names a subcommand and
  options that exist.
* The SLURM plan-file table lists exactly the keys the code reads.
* The README stays short, keeps CI's test command, and links only to files that exist; nothing in the
  documentation points outside the repository.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README = REPO / "README.md"
HOOK = DOCS / "_hooks" / "reference.py"


def _hook():
    spec = importlib.util.spec_from_file_location("nnunet_ext_docs_hook", HOOK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "_hooks" not in p.parts)


def _mkdocs(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          cwd=config.parent, env=env, capture_output=True, text=True, timeout=600)


# --- the site builds -----------------------------------------------------------------------------------

def test_site_builds_strictly(tmp_path):
    result = _mkdocs(REPO / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    for command in ("nnunet-ext merge", "nnunet-ext predict", "nnunet-ext slurm", "nnunet-ext convert kits21"):
        assert command in cli, command
    api = (tmp_path / "site" / "reference" / "api" / "trainers" / "index.html").read_text()
    assert "nnunet_ext.trainers.base" in api and "nnUNetExtTrainer" in api  # the installed layout was documented


def test_strict_build_fails_on_a_broken_anchor_of_the_generated_page(tmp_path):
    """The strict build is a real check: a link to an option section that does not exist fails it."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# x\n\n[gone](reference/cli.md#nnunet-ext-no-such-command)\n")
    (tmp_path / "mkdocs.yml").write_text(
        f"site_name: t\nstrict: true\nhooks:\n  - {HOOK}\nvalidation:\n  anchors: warn\n"
        "markdown_extensions:\n  - attr_list\n  - toc\n  - tables\n")
    result = _mkdocs(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "nnunet-ext-no-such-command" in result.stdout + result.stderr


# --- the CLI reference and the commands quoted in the pages ---------------------------------------------

def test_cli_reference_lists_every_subcommand_and_option():
    hook = _hook()
    parser = hook.build_parser()
    page = hook.cli_reference_markdown(parser)
    sections = re.split(r"^#+ `(nnunet-ext[^`]*)`", page, flags=re.MULTILINE)
    by_command = dict(zip(sections[1::2], sections[2::2]))
    paths = list(hook.walk(parser))
    assert {"merge", "predict", "slurm", "convert", "submit", "preprocess-unlabeled"} <= {p[0][0] for p in paths}
    for path, sub, _ in paths:
        command = " ".join(("nnunet-ext", *path))
        assert command in by_command, command
        for option in hook.option_strings(sub) - {"-h", "--help"}:
            assert f"`{option}`" in by_command[command], (command, option)


def _shell_commands(text: str) -> list[str]:
    """Every ``nnunet-ext ...`` command in code: fenced or indented code blocks and inline code spans."""
    text = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
    fragments, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            fragments.append(line)
        else:
            fragments += re.findall(r"`([^`]+)`", line)
    commands = []
    for fragment in fragments:
        for match in re.finditer(r"(?<![\w/.-])nnunet-ext ([a-z].*)", fragment):
            commands.append(match.group(1))
    return commands


def _words(command: str) -> list[str]:
    command = re.split(r"\s#|\s&&|\s\||;|\)|\"\)", command)[0]
    try:
        return shlex.split(command)
    except ValueError:
        return command.split()


def test_every_quoted_nnunet_ext_command_uses_existing_subcommands_and_options():
    hook = _hook()
    parser = hook.build_parser()
    parsers = {path: sub for path, sub, _ in hook.walk(parser)}
    problems = []
    checked = 0
    for source in [README, *_pages()]:
        for command in _shell_commands(source.read_text(encoding="utf-8")):
            words = _words(command)
            if not words or words[0] in ("COMMAND", "...") or not re.match(r"^[a-z][a-z0-9-]*$", words[0]):
                continue
            path = (words[0],)
            if path not in parsers:
                problems.append(f"{source.relative_to(REPO)}: unknown subcommand in 'nnunet-ext {command}'")
                continue
            if len(words) > 1 and (path + (words[1],)) in parsers:
                path += (words[1],)
            options = hook.option_strings(parsers[path])
            if hook.subcommands(parsers[path]):  # e.g. `convert` alone: its sub-subcommands' options also count
                for child in hook.subcommands(parsers[path]).values():
                    options |= hook.option_strings(child[0])
            for word in words[len(path):]:
                for flag in re.split(r"[|\[\]{}]", word):
                    flag = flag.split("=")[0].strip(",.:")
                    if re.match(r"^--?[A-Za-z]", flag) and flag not in options:
                        problems.append(f"{source.relative_to(REPO)}: 'nnunet-ext {' '.join(path)}' has no option "
                                        f"{flag} (in 'nnunet-ext {command}')")
            checked += 1
    assert checked > 50, checked  # the scan found the commands
    assert not problems, "\n".join(problems)


def test_plan_file_table_lists_exactly_the_keys_the_code_reads():
    from nnunet_ext.cluster.spec import KEYS

    hook = _hook()
    slurm = dict((path, sub) for path, sub, _ in hook.walk(hook.build_parser()))[("slurm",)]
    options = hook.option_strings(slurm)
    table = [line for line in (DOCS / "reference" / "slurm-plan.md").read_text().splitlines()
             if line.startswith("| `")]
    documented, flags = set(), set()
    for row in table:
        first = row.split("|")[1]
        head, _, flag_part = first.partition("(")
        documented |= set(re.findall(r"`([a-z_]+)`", head))
        flags |= {f for f in re.findall(r"`(--?[a-z][a-z-]*)", flag_part)}
    assert documented == set(KEYS), documented ^ set(KEYS)
    assert flags <= options, flags - options


# --- README and links ---------------------------------------------------------------------------------

def test_readme_is_short_and_keeps_the_commands_ci_runs():
    text = README.read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) <= 8 * 1024
    assert 'pip install -e ".[test]" && pytest' in text  # .ci/run runs exactly this
    assert "nnunet-ext demo" in text


def test_readme_links_point_to_files_in_the_repository():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+://", target):
            continue
        assert (REPO / target).exists(), target


# Files that still cite documents outside the repository. They belong to other work in progress; the
# documentation cites papers and official repositories instead. Remove entries as they are fixed.
OUTSIDE_REFERENCE_EXCEPTIONS: set[str] = set()


def test_nothing_refers_to_files_outside_the_repository():
    pattern = re.compile(r"METHODS\.md|\.\./shared|/work/shared|PACKAGING-NOTES|STYLE\.md")
    offenders = []
    for path in REPO.rglob("*"):
        relative = path.relative_to(REPO).as_posix()
        if (not path.is_file() or path.suffix not in (".py", ".md", ".toml", ".yml", ".cfg", ".txt", ".cff")
                or relative.split("/")[0] in (".venv", "build", ".git") or ".egg-info" in relative
                or relative == "tests/test_docs.py" or relative in OUTSIDE_REFERENCE_EXCEPTIONS):
            continue
        if pattern.search(path.read_text(encoding="utf-8", errors="replace")):
            offenders.append(relative)
    assert not offenders, offenders
