"""MkDocs hook: the parts of the site that are generated from the code, so they cannot drift.

* ``reference/cli.md``: every ``nnunet-ext`` subcommand with its usage and options, read from the
  argument parsers (:func:`cli_reference_markdown`) at build time.
* The API pages (mkdocstrings) read the installed layout: ``trainers/``, ``architectures/`` and
  ``plans/`` are installed as ``nnunet_ext.trainers`` ... (pyproject's ``package-dir``), which
  static analysis of the source tree cannot see. :func:`api_source_tree` assembles that layout in a
  temporary folder, and the hook points mkdocstrings at it.

``tests/test_docs.py`` builds the site with ``mkdocs build --strict`` and checks every
``nnunet-ext`` option quoted in the hand-written pages against the same parsers.
"""
from __future__ import annotations

import argparse
import atexit
import html
import re
import shutil
import sys
import tempfile
from pathlib import Path

from mkdocs.plugins import event_priority

REPO = Path(__file__).resolve().parents[2]
CLI_PAGE = "reference/cli.md"


# --- the CLI reference -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The ``nnunet-ext`` parser (imports only the light CLI modules)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from nnunet_ext.cli.main import build_parser as build

    return build()


def subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.ArgumentParser, str]]:
    """Subcommand name -> (its parser, its one-line help), in the order they were added."""
    for action in parser._actions:  # noqa: SLF001 - argparse has no public walk over subparsers
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}  # noqa: SLF001
            return {name: (sub, helps.get(name, "")) for name, sub in action.choices.items()}
    return {}


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser, one-line help) for every subcommand, depth first, e.g. ('convert', 'kits21')."""
    for name, (sub, help_text) in subcommands(parser).items():
        yield (*path, name), sub, help_text
        yield from walk(sub, (*path, name))


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string a parser accepts (``-h`` included)."""
    return {string for action in parser._actions for string in action.option_strings}  # noqa: SLF001


def _text(value: str) -> str:
    """Plain help text as Markdown: HTML-escaped, Markdown's special characters escaped."""
    value = html.escape(" ".join(value.split()), quote=False)
    return re.sub(r"([\\`*_\[\]|#])", r"\\\1", value)


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    return parser._get_formatter()._expand_help(action)  # noqa: SLF001 - resolves %(default)s


def _argument(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices and not isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
        return "{" + ",".join(map(str, action.choices)) + "}"
    metavar = action.metavar or action.dest.upper()
    if action.nargs in ("+", "*"):
        return f"{metavar} [{metavar} ...]"
    return str(metavar)


def _default(action: argparse.Action) -> str:
    if action.required or action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
        return ""
    if isinstance(action.default, (list, tuple)):
        return " ".join(map(str, action.default)) if action.default else ""
    return str(action.default)


def _options_table(parser: argparse.ArgumentParser) -> list[str]:
    lines = []
    for group in parser._action_groups:  # noqa: SLF001
        actions = [a for a in group._group_actions  # noqa: SLF001
                   if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]  # noqa: SLF001
        if not actions:
            continue
        if group.title not in ("options", "optional arguments", "positional arguments"):
            lines += [f"**{_text(group.title)}**", ""]
        lines += ["| argument | value | required | default | meaning |", "|---|---|---|---|---|"]
        for action in actions:
            names = " ".join(f"`{s}`" for s in action.option_strings) or f"`{action.metavar or action.dest}`"
            required = "yes" if action.required or not action.option_strings else ""
            value = _argument(action) if action.option_strings else ""
            lines.append(f"| {names} | {_text(value)} | {required} | {_text(_default(action))} | "
                         f"{_text(_help(parser, action))} |")
        lines.append("")
    return lines


def cli_reference_markdown(parser: argparse.ArgumentParser | None = None) -> str:
    """The page ``reference/cli.md``: every subcommand, its usage, description, options and epilog."""
    parser = parser or build_parser()
    lines = ["# Command-line reference", "",
             "Generated from the argument parsers of the installed version when the site is built "
             "(`nnunet-ext COMMAND --help` prints the same). Training, prediction and evaluation use nnU-Net's "
             "own `nnUNetv2_*` commands with `-tr <Trainer>`; see [Getting started](../getting-started.md).", "",
             f"`{parser.prog}`: {_text(parser.description or '')}", ""]
    lines += ["| command | what it does |", "|---|---|"]
    for path, _, help_text in walk(parser):
        if len(path) == 1:
            anchor = "nnunet-ext-" + path[0]
            lines.append(f"| [`nnunet-ext {path[0]}`](#{anchor}) | {_text(help_text)} |")
    lines.append("")
    for path, sub, help_text in walk(parser):
        command = " ".join((parser.prog, *path))
        anchor = "-".join(("nnunet-ext", *path))
        lines += [f"{'#' * (len(path) + 1)} `{command}` {{#{anchor}}}", ""]
        if sub.description:
            lines += [_text(sub.description), ""]
        elif help_text:
            lines += [_text(help_text), ""]
        usage = sub.format_usage().strip().removeprefix("usage: ")  # continuation lines are indented for it
        usage = "\n".join(line[len("usage: "):] if index and line.startswith(" " * len("usage: ")) else line
                          for index, line in enumerate(usage.splitlines()))
        lines += ["```text", usage, "```", ""]
        lines += _options_table(sub)
        children = subcommands(sub)
        if children:
            lines += [f"Subcommands: {', '.join(f'[`{name}`](#{anchor}-{name})' for name in children)}.", ""]
        if sub.epilog:
            lines += [_text(sub.epilog), ""]
    return "\n".join(lines)


# --- the API source tree -----------------------------------------------------------------------------

def package_dir_mapping() -> dict[str, str]:
    """Installed package -> source folder for the folders installed under another name."""
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    return dict(config.get("tool", {}).get("setuptools", {}).get("package-dir", {}))


def api_source_tree(target: Path) -> Path:
    """Copy the Python sources into ``target`` in their installed layout; returns ``target``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "nnunet_ext", target / "nnunet_ext", ignore=ignore)
    for package, folder in package_dir_mapping().items():
        destination = target.joinpath(*package.split("."))
        shutil.rmtree(destination, ignore_errors=True)
        shutil.copytree(REPO / folder, destination, ignore=ignore)
    return target


# --- MkDocs events ------------------------------------------------------------------------------------

@event_priority(100)  # before mkdocstrings' own on_config, which may create the Python handler already
def on_config(config):
    folder = Path(tempfile.mkdtemp(prefix="nnunet_ext_docs_api_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    api_source_tree(folder)
    plugin = config.plugins.get("mkdocstrings")
    if plugin is not None:
        python = plugin.config.handlers.setdefault("python", {})
        python["paths"] = [str(folder)]
    return config


def on_files(files, config):
    from mkdocs.structure.files import File

    files.append(File.generated(config, CLI_PAGE, content=cli_reference_markdown()))
    return files
