"""The ``pointnuc`` command: a thin click shell over :mod:`pointnuc.pipeline`.

Heavy imports (torch, paquo) happen inside commands so ``--help`` is instant.
User errors (:class:`pointnuc.errors.PointnucError`, and OS errors such as a full
disk or a missing permission) end in one line on stderr and a non-zero exit;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import logging
import sys

import click

from pointnuc import __version__
from pointnuc.errors import PointnucError


#: OS errors that are the user's to fix (permissions, a full or read-only disk): one line, no traceback
_USER_OS_ERRORS = {errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT}


class _Group(click.Group):
    """Turns PointnucError into one clear line and its exit code."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except PointnucError as err:
            click.echo(f"pointnuc: error: {err}", err=True)
            sys.exit(err.exit_code)
        except OSError as err:
            if err.errno not in _USER_OS_ERRORS:
                raise
            where = f": {err.filename}" if err.filename else ""
            click.echo(f"pointnuc: error: {err.strerror or err}{where}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("pointnuc: interrupted; re-run the same command to continue where it stopped", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="pointnuc")
@click.option("-v", "--verbose", is_flag=True, help="Show debug messages.")
def main(verbose: bool) -> None:
    """Nuclei segmentation for QuPath from a few clicked points.

    \b
    1. In QuPath, click a point (Points tool, class "Nucleus") on ~10% of the nuclei.
    2. pointnuc train PROJECT      learns a detector, then a segmenter, from those points.
    3. pointnuc segment PROJECT    writes every nucleus back as QuPath detections.

    PROJECT is a QuPath project (project.qpproj, needs a QuPath installation for paquo)
    or a folder of images with QuPath GeoJSON exports beside them (NAME.tif + NAME.geojson).
    """
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="pointnuc: %(message)s")
    logging.getLogger("pointnuc").setLevel(level)
    for noisy in ("PIL", "tifffile", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _register() -> None:
    from pointnuc.cli.evaluate import evaluate_cmd
    from pointnuc.cli.inspect import inspect_cmd
    from pointnuc.cli.segment import segment_cmd
    from pointnuc.cli.train import train_cmd

    for cmd in (inspect_cmd, train_cmd, segment_cmd, evaluate_cmd):
        main.add_command(cmd)


_register()
