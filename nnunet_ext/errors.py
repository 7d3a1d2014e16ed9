"""Exceptions whose message is meant for the user: what is wrong, which file, how to fix it."""


class UserFacingError(Exception):
    """Bad input or set-up. The CLI prints the message without a traceback and exits with status 2."""


def _one_line_hook(previous):
    import sys

    def hook(kind, value, traceback):
        if isinstance(value, UserFacingError):
            print(f"nnunet-ext: error: {value}", file=sys.stderr)
            return
        previous(kind, value, traceback)
    hook.nnunet_ext = True
    return hook


def install_excepthook() -> None:
    """Make an uncaught UserFacingError print its one-line message (exit code 1) instead of a traceback.

    For the stock commands that run our code (``nnUNetv2_train -tr ...``): nnU-Net does not know our
    error type, so without this a bad setting would end in a traceback. Other exceptions are shown
    exactly as before. Idempotent.
    """
    import sys

    if not getattr(sys.excepthook, "nnunet_ext", False):
        sys.excepthook = _one_line_hook(sys.excepthook)
