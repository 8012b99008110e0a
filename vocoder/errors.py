"""Errors users see as one line, never as a traceback."""

from __future__ import annotations

import functools
import os
import sys


class VocoderError(Exception):
    """An error whose message alone tells the user what is wrong."""


class InputError(VocoderError):
    """A file handed to us that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class CheckpointError(VocoderError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def report_errors(fn):
    """Decorate a command's body: known errors become ``error: ...`` and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VocoderError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
