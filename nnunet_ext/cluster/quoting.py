"""What may go into a generated job script, and how it is written there.

Two programs read our scripts. bash runs every line; sbatch reads the ``#SBATCH`` lines first,
with its own small grammar and no shell (Slurm's ``src/sbatch/opt.c``: arguments end at unquoted
whitespace, ``'...'`` and ``"..."`` group, a backslash escapes the next character, an unescaped
``#`` starts a comment, and any ``#SBATCH`` line that contains ``hetjob`` or ``packjob``, in any
case and anywhere, starts the next component of a heterogeneous job). So a value from the plan or
the command line reaches a script in one of three ways:

- in bash, as one word quoted with :func:`shell_word` (``shlex.quote``), never pasted into a
  double-quoted string;
- in an ``#SBATCH`` line, as a name that sbatch reads as it is (:func:`check_sbatch_name` refuses
  whitespace, quotes, backslashes, ``#`` and ``hetjob``/``packjob`` instead of quoting them: no
  account, partition, QOS or gres name contains them, so such a value is a mistake), or a path in
  sbatch's own quoting (:func:`sbatch_word`, for the log folder, where spaces are legitimate);
- not at all: text that cannot be written on one line (line breaks, NUL, other control
  characters, Unicode line separators and bidirectional overrides, which make a script read
  differently from how it runs) is refused by :func:`check_text` before anything is written.
"""
from __future__ import annotations

import re
import shlex
import unicodedata

from nnunet_ext.errors import UserFacingError

_NAMED = {"\n": "a line break (\\n)", "\r": "a carriage return (\\r)", "\0": "a NUL byte (\\0)",
          "\t": "a tab (\\t)"}
_BIDI_CONTROLS = {"LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI", "FSI", "PDI"}
# what sbatch's #SBATCH parser does with each character it treats specially
_SBATCH_SPECIAL = {" ": ("a space", "split the value into two options there"),
                   "'": ("a quote (')", "take as the start of a quoted string and drop"),
                   '"': ('a quote (")', "take as the start of a quoted string and drop"),
                   "\\": ("a backslash", "take as an escape and drop"),
                   "#": ("'#'", "take as the start of a comment and drop the rest of the line")}
_HETJOB = re.compile("hetjob|packjob", re.IGNORECASE)


def unsafe_character(value: str, *, allow_tab: bool = False) -> str | None:
    """How the first character that cannot stand in a one-line script value is called, or None."""
    for character in value:
        if character == "\t" and allow_tab:
            continue
        if (unicodedata.category(character) in ("Cc", "Zl", "Zp")
                or unicodedata.bidirectional(character) in _BIDI_CONTROLS):
            return _NAMED.get(character, f"the control character U+{ord(character):04X}")
    return None


def show(value: str, limit: int = 60) -> str:
    """``repr`` of a value, shortened: one line whatever it holds."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 4] + "...'"


def check_text(where: str, value: str, *, allow_tab: bool = False) -> str:
    """Refuse text that cannot be written as one line of a script; ``where`` names the field."""
    problem = unsafe_character(value, allow_tab=allow_tab)
    if problem is not None:
        raise UserFacingError(f"{where}: {show(value)} contains {problem}; a value written into the job scripts must "
                              f"be one line of printable text. Remove that character and run again (nothing was "
                              f"written).")
    return value


def check_sbatch_name(where: str, value: str, example: str) -> str:
    """Refuse a value of an ``#SBATCH`` option that sbatch would not read back as written."""
    check_text(where, value)
    for character in value:
        if character in _SBATCH_SPECIAL or character.isspace():
            name, effect = _SBATCH_SPECIAL.get(character, ("whitespace", "split the value into two options there"))
            raise UserFacingError(f"{where}: {show(value)} contains {name}, which sbatch would {effect} when it "
                                  f"reads the #SBATCH line. Give the name as SLURM knows it (no spaces, quotes, "
                                  f"backslashes or '#'), e.g. {example}.")
    _check_no_hetjob(where, value)
    return value


def sbatch_word(where: str, value: str) -> str:
    """``value`` as one argument of an ``#SBATCH`` line: as it is when sbatch reads it so, otherwise in
    double quotes with ``\\``, ``"`` and ``#`` escaped (older sbatch versions end a quoted string at
    an unescaped ``#`` too)."""
    check_text(where, value)
    _check_no_hetjob(where, value)
    if not any(c in _SBATCH_SPECIAL or c.isspace() for c in value):
        return value
    return '"' + re.sub(r'(["\\#])', r"\\\1", value) + '"'


def shell_word(value: object) -> str:
    """One bash word that expands to exactly ``str(value)`` (``shlex.quote``)."""
    return shlex.quote(str(value))


def shell_command(*words: object) -> str:
    """A command line of bash words, each quoted on its own."""
    return " ".join(shell_word(word) for word in words)


def _check_no_hetjob(where: str, value: str) -> None:
    match = _HETJOB.search(value)
    if match:
        raise UserFacingError(f"{where}: {show(value)} contains {match.group(0)!r}; sbatch reads any #SBATCH line "
                              f"holding that word as the start of another job component (a heterogeneous job), "
                              f"whatever the quoting. Choose a value without it.")
