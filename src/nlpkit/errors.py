"""Errors a user can fix. The CLI prints them as one line and exits 2; anything else is a bug (exit 1)."""


class NlpkitError(Exception):
    """Bad input: config, data, paths or arguments. The message names the key, file or row and the fix."""

    exit_code = 2
