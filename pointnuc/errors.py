"""Exceptions that end a command with one clear line and a non-zero exit.

Anything raised as a :class:`PointnucError` is a user-facing problem (bad input,
missing dependency, damaged file); the CLI prints ``str(err)`` on one line and
exits with ``err.exit_code``. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno

#: OS errors that are the user's to fix (permissions, a full or read-only disk): one line, no traceback
USER_OS_ERRORS = frozenset({errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT})


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


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is the user's to fix (a :class:`PointnucError`, or an OS error of :data:`USER_OS_ERRORS`)
    rather than a bug, which must keep its traceback."""
    return isinstance(err, PointnucError) or (isinstance(err, OSError) and err.errno in USER_OS_ERRORS)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the command (a KeyboardInterrupt, so cleanup code treats both alike).

    The CLI prints one line and exits with 128 + the signal number (130, 143).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


#: the signal that asked the command to stop (set by the CLI's handler, cleared when the command ends)
_stop_requested: int | None = None


def request_stop(signum: int | None) -> None:
    """Note that SIGINT/SIGTERM asked the command to stop (None: forget it, the command has ended)."""
    global _stop_requested
    _stop_requested = signum


def raise_if_stop_requested() -> None:
    """Raise :class:`Interrupted` again if a stop was asked for: the handler's own exception is lost when the
    signal lands while Python runs a ``__del__`` or a callback ("Exception ignored in ..."); long loops call
    this between their steps, so the command still stops."""
    if _stop_requested is not None:
        raise Interrupted(_stop_requested)
