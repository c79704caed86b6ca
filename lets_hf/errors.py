"""Errors that are the user's to fix, kept apart from program bugs.

`lets-hf` prints a `UsageError` in one or two lines and exits 2 (`--debug`, or
`LETS_HF_DEBUG=1`, shows the traceback); any other exception keeps its traceback.
"""

from __future__ import annotations

import contextlib


class UsageError(ValueError):
    """A mistake in the settings or the inputs, with a message that says what to change."""


@contextlib.contextmanager
def user_inputs():
    """Errors raised while reading what the user pointed to (flags, files, folders) become `UsageError`s."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, OSError) as error:
        raise UsageError(str(error)) from error
