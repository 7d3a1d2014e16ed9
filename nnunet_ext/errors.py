"""Exceptions whose message is meant for the user: what is wrong, which file, how to fix it."""


class UserFacingError(Exception):
    """Bad input or set-up. The CLI prints the message without a traceback and exits with status 2."""
