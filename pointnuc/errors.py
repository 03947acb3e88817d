"""Exceptions that end a command with one clear line and a non-zero exit.

Anything raised as a :class:`PointnucError` is a user-facing problem (bad input,
missing dependency, damaged file); the CLI prints ``str(err)`` on one line and
exits with ``err.exit_code``. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class PointnucError(Exception):
    """Base class: a problem the user can fix; message is one sentence."""

    exit_code = 2


class InputError(PointnucError):
    """A path, file or option the user gave is missing, malformed or inconsistent."""


class QuPathNotFoundError(PointnucError):
    """paquo could not find a usable QuPath installation."""


class ImageReadError(InputError):
    """An image file is missing, unreadable or corrupt."""


class PixelSizeError(InputError):
    """An image has no pixel size and none was given."""


class ModelFormatError(PointnucError):
    """A model folder is unknown, damaged or from an incompatible version."""


class TrainingError(PointnucError):
    """Training cannot go on (no points, NaN loss, resume mismatch, ...)."""

    exit_code = 3


class OutputExistsError(InputError):
    """The output exists and --overwrite was not given."""


class QuPathError(PointnucError):
    """QuPath (its JVM, in pointnuc's QuPath process) failed or stopped while reading or writing a project."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the command (a KeyboardInterrupt, so cleanup code treats both alike).

    The CLI prints one line and exits with 128 + the signal number (130, 143).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
