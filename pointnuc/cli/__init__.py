"""The ``pointnuc`` command: a thin click shell over :mod:`pointnuc.pipeline`.

Heavy imports (torch, paquo) happen inside commands so ``--help`` is instant.
User errors (:class:`pointnuc.errors.PointnucError`, and OS errors such as a full
disk or a missing permission) end in one line on stderr and a non-zero exit;
anything else is a bug and keeps its traceback. SIGINT (Ctrl-C) and SIGTERM stop a
command the same way: cleanup runs (a QuPath project being written is restored), then one
line says how to continue, and the exit status is 130 or 143.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

import click

from pointnuc import __version__
from pointnuc.cli.stop import interrupt_message, stop_on_signals
from pointnuc.errors import PointnucError, is_user_error


class _Group(click.Group):
    """Turns PointnucError into one clear line and its exit code; SIGINT/SIGTERM into one line and 130/143."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with stop_on_signals():
                return super().invoke(ctx)
        except PointnucError as err:
            click.echo(f"pointnuc: error: {err}", err=True)
            sys.exit(err.exit_code)
        except OSError as err:
            if not is_user_error(err):
                raise
            where = f": {err.filename}" if err.filename else ""
            click.echo(f"pointnuc: error: {err.strerror or err}{where}", err=True)
            sys.exit(2)
        except KeyboardInterrupt as err:
            signum = getattr(err, "signum", signal.SIGINT)
            click.echo(f"pointnuc: {interrupt_message(ctx, signum)}", err=True)
            sys.exit(128 + signum)


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
    # other libraries' INFO messages stay quiet (torch logs cache statistics at exit when its import was interrupted)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="pointnuc: %(message)s")
    logging.getLogger("pointnuc").setLevel(level)
    for noisy in ("PIL", "tifffile", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _register() -> None:
    from pointnuc.cli.evaluate import evaluate_cmd
    from pointnuc.cli.inspect import inspect_cmd
    from pointnuc.cli.segment import segment_cmd
    from pointnuc.cli.suggest import suggest_cmd
    from pointnuc.cli.train import train_cmd

    for cmd in (inspect_cmd, train_cmd, segment_cmd, suggest_cmd, evaluate_cmd):
        main.add_command(cmd)


_register()
