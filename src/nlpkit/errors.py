"""Errors a user can fix. The CLI prints them as one line and exits 2; anything else is a bug (exit 1)."""


class NlpkitError(Exception):
    """Bad input: config, data, paths or arguments. The message names the key, file or row and the fix."""

    exit_code = 2


class TrainingStopped(NlpkitError):
    """The watchdog stopped a run (NaN/inf gradients, a loss stuck at 0): exit 3, the last good checkpoint kept."""

    exit_code = 3
