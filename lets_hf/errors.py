"""Errors that are the user's to fix, kept apart from program bugs.

`lets-hf` prints a `UsageError` in one or two lines and exits 2 (`--debug`, or
`LETS_HF_DEBUG=1`, shows the traceback); any other exception keeps its traceback.

A message names each setting with `setting` (or `unset`), so that it reads as the user wrote
it: `sam_variant='none'` in Python, `--method adamw` on the command line (`command_line`).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import shlex

_ON_COMMAND_LINE = contextvars.ContextVar("lets_hf_on_command_line", default=False)
_NAME_ONLY = object()


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


@contextlib.contextmanager
def command_line():
    """Within it, messages spell settings as flags: the user typed `--rho`, not `rho=`."""
    token = _ON_COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _ON_COMMAND_LINE.reset(token)


def setting(name: str, value=_NAME_ONLY) -> str:
    """A setting (`name`, or `name` set to `value`) as the user spells it: `rho=0.05` in Python,
    `--rho 0.05` on the command line, where no perturbation is `--method adamw`."""
    if not _ON_COMMAND_LINE.get():
        return name if value is _NAME_ONLY else f"{name}={value!r}"
    if name == "sam_variant" and value == "none":
        return "--method adamw"
    if value is _NAME_ONLY or value is True:
        return f"--{name}"
    return f"--{name} {shlex.quote(json.dumps(value) if isinstance(value, dict) else str(value))}"


def unset(name: str, off=False) -> str:
    """How to turn a setting off: `set fp16=False` in Python; on the command line, `remove --fp16`."""
    return f"remove {setting(name)}" if _ON_COMMAND_LINE.get() else f"set {setting(name, off)}"
