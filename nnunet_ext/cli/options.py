"""Argument definitions shared by several subcommands, written once.

:func:`challenge_parsers` builds a command with one sub-command per registered challenge
(``submit``, ``container``, ``challenge-infer``); :func:`add_task_argument` adds a challenge's
``--task``; :func:`add_model_arguments` adds ``-c -tr -p -f -chk``, the trained model with
nnUNetv2_predict's names and defaults; :func:`parse_folds` reads ``-f`` values as nnU-Net takes them;
:func:`process_count` reads a number of worker processes where 0 means this process.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from nnunet_ext.challenges.registry import Challenge


def challenge_parsers(subparsers: argparse._SubParsersAction, name: str, help: str, description: str,
                      help_each: str) -> list[tuple[Challenge, argparse.ArgumentParser]]:
    """``nnunet-ext NAME CHALLENGE ...``: the command's parser and one sub-parser per registered challenge.

    ``help`` may hold ``{challenges}``, replaced by the challenges' titles; each sub-parser's help is
    ``"<title> <help_each>"``. Returns ``(challenge, sub-parser)`` pairs in registry order.
    """
    from nnunet_ext.challenges import registry

    titles = ", ".join(entry.title for entry in registry.CHALLENGES)
    parser = subparsers.add_parser(name, help=help.format(challenges=titles), description=description)
    challenges = parser.add_subparsers(dest="challenge", metavar="CHALLENGE", required=True)
    return [(entry, challenges.add_parser(entry.name, help=f"{entry.title} {help_each}"))
            for entry in registry.CHALLENGES]


def process_count(text: str) -> int:
    """An argparse type: a number of worker processes, 0 (work in this process) or more."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no worker processes) or more, got {text}")
    return value


def add_task_argument(parser: argparse.ArgumentParser, tasks: Sequence[str]) -> None:
    """``--task`` (required, one of ``tasks``) for a challenge that has tasks; nothing otherwise."""
    if tasks:
        parser.add_argument("--task", choices=tasks, required=True, help="the challenge's task")


def add_model_arguments(parser: argparse.ArgumentParser, folds_default: list[str] | None, folds_help: str) -> None:
    """``-c -tr -p -f -chk``: which trained model below nnUNet_results, as nnUNetv2_predict names them."""
    parser.add_argument("-c", dest="configuration", default="3d_fullres", help="configuration (default 3d_fullres)")
    parser.add_argument("-tr", dest="trainer", default="nnUNetTrainer", help="trainer (default nnUNetTrainer)")
    parser.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-f", dest="folds", nargs="+", default=folds_default, help=folds_help)
    parser.add_argument("-chk", dest="checkpoint", default="checkpoint_final.pth", help="checkpoint file name")


def parse_folds(values: Sequence[str] | None) -> tuple[int | str, ...] | None:
    """``-f`` values as nnU-Net takes them: numbers, or 'all'; None stays None."""
    from nnunet_ext.errors import UserFacingError

    if values is None:
        return None
    folds: list[int | str] = []
    for value in values:
        if value == "all":
            folds.append(value)
        elif value.isdigit():
            folds.append(int(value))
        else:
            raise UserFacingError(f"-f {value!r}: a fold is a number (0, 1, ...) or 'all'.")
    return tuple(folds)
