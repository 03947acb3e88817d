"""A real QuPath 0.6.0 for the tests, always in a child process.

``../shared/qupath-0.6.0/assemble.sh`` builds a QuPath folder that paquo drives (QuPath's own jars,
a Java 21 runtime; no Bio-Formats, OpenSlide or OpenCV). paquo starts a JVM when
``paquo.projects`` (or ``paquo.java``) is imported, one per process and never restartable, so the
test process itself never imports them: everything that needs Java runs this file as a script in a
child process, which writes its answer as JSON to a file (QuPath logs on stdout).

In the test process::

    qupath = setup_qupath(shared_dir, repo / ".qupath")   # assemble once, probe; KitUnavailable if not
    kit("dump-project", project_dir)                       # every object of every image, as QuPath has it
    kit("read-geojson", *files)                            # PathIO.readObjects of each file
    kit("watershed", "image.tif")                          # QuPath's WatershedCellDetection on a TIFF
    kit("shape-measurements", "objects.json")              # ObjectMeasurements.addShapeMeasurements

From a shell (``PAQUO_QUPATH_DIR`` set as ``assemble.sh`` prints it)::

    python tests/qupath_kit.py watershed image.tif --params '{"cellExpansionMicrons": 3}' --out cells.json

(``watershed`` also reports the seconds QuPath's detection took, with ``--threads N`` if wanted.)

Geometries travel as hex WKB (exact), as QuPath's JTS writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
QUPATH_VERSION = "0.6.0"

#: QuPath's default parameters of Analyze > Cell detection > Cell detection for H&E at 0.5 µm/px
WATERSHED_DEFAULTS: dict[str, Any] = {
    "detectionImageBrightfield": "Hematoxylin OD", "requestedPixelSizeMicrons": 0.5,
    "backgroundRadiusMicrons": 8.0, "backgroundByReconstruction": True, "medianRadiusMicrons": 0.0,
    "sigmaMicrons": 1.5, "minAreaMicrons": 10.0, "maxAreaMicrons": 400.0, "threshold": 0.1,
    "maxBackground": 2.0, "watershedPostProcess": True, "cellExpansionMicrons": 5.0, "includeNuclei": True,
    "smoothBoundaries": True, "makeMeasurements": True,
}


class KitUnavailable(RuntimeError):
    """No real QuPath here (no shared kit, assembly or probe failed); the message says why."""


class KitError(RuntimeError):
    """A child process with QuPath failed."""


# --------------------------------------------------------------------------- test-process side


def setup_qupath(shared: Path, dest: Path, timeout: float = 300) -> Path:
    """Assemble QuPath 0.6.0 from ``shared`` into ``dest`` (idempotent) and check paquo finds it.

    Returns the QuPath folder (the value for ``PAQUO_QUPATH_DIR``). Nothing here starts a JVM.
    """
    script = Path(shared) / "qupath-0.6.0" / "assemble.sh"
    if not Path(shared).is_dir():
        raise KitUnavailable(f"no shared folder at {shared}, so no QuPath kit to assemble")
    if not script.is_file():
        raise KitUnavailable(f"no QuPath kit in the shared folder ({script} is missing)")
    try:
        r = subprocess.run(["bash", str(script), str(dest)], capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "PYTHON": sys.executable})
    except subprocess.TimeoutExpired:
        raise KitUnavailable(f"assembling QuPath with {script} took over {timeout:.0f} s") from None
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines or not lines[-1].startswith("export PAQUO_QUPATH_DIR="):
        raise KitUnavailable(f"{script} failed (exit {r.returncode}): {_tail(r.stderr or r.stdout)}")
    qupath = Path(lines[-1].split("=", 1)[1])
    try:
        p = subprocess.run([sys.executable, "-m", "paquo", "--qupath-version"], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "PAQUO_QUPATH_DIR": str(qupath)})
    except subprocess.TimeoutExpired:
        raise KitUnavailable("`python -m paquo --qupath-version` did not answer in 120 s") from None
    version = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
    if p.returncode != 0 or version != QUPATH_VERSION:
        raise KitUnavailable(f"paquo does not find QuPath {QUPATH_VERSION} in {qupath} "
                             f"(exit {p.returncode}: {_tail(p.stderr or p.stdout)})")
    return qupath


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child that may start QuPath: this checkout's pointnuc first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra or {})
    if not env.get("PAQUO_QUPATH_DIR"):
        raise KitUnavailable("PAQUO_QUPATH_DIR is not set (use the qupath_dir fixture)")
    return env


def kit(command: str, *args: str | os.PathLike[str], timeout: float = 180) -> Any:
    """Run one command of this file in a child process with QuPath; its JSON answer.

    The answer is a dict; ``log_warnings`` lists the WARN/ERROR lines QuPath logged meanwhile.
    """
    with tempfile.TemporaryDirectory(prefix="qupath-kit-") as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), command, *map(str, args), "--out", str(out)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env(), cwd=REPO)
        except subprocess.TimeoutExpired as err:
            raise KitError(f"{command} did not finish in {timeout:.0f} s: {_tail(_text(err.stderr))}") from None
        if r.returncode != 0 or not out.is_file():
            raise KitError(f"{command} failed (exit {r.returncode}): {_tail(r.stderr + r.stdout)}")
        result = json.loads(out.read_text(encoding="utf-8"))
    result["log_warnings"] = log_warnings(r.stdout + r.stderr)
    return result


def python_with_qupath(code: str, timeout: float = 180) -> Any:
    """Run Python ``code`` in a child process that may start QuPath; it stores its answer with
    ``answer(obj)`` (JSON). Returns that answer."""
    return kit("python", "-c", code, timeout=timeout)["answer"]


def log_warnings(text: str) -> list[str]:
    """QuPath's (logback's) WARN and ERROR lines in a child's output."""
    return [ln for ln in text.splitlines() if " [WARN] " in ln or " [ERROR] " in ln]


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _tail(text: str, n: int = 12) -> str:
    """The last lines of a child's output without QuPath's DEBUG/INFO chatter."""
    lines = [ln for ln in text.splitlines() if ln.strip() and " [DEBUG] " not in ln and " [INFO] " not in ln]
    return " | ".join(lines[-n:]) if lines else "(no output)"


# --------------------------------------------------------------------------- child-process side


def _java() -> Any:
    """Start QuPath's JVM (through paquo) and return jpype."""
    import jpype
    import paquo.java  # noqa: F401  (starts the JVM with QuPath's classpath)

    return jpype


def _wkb_hex(jpype: Any, geometry: Any) -> str:
    return bytes(jpype.JClass("org.locationtech.jts.io.WKBWriter")(2).write(geometry)).hex()


def _geometry(jpype: Any, wkb_hex: str) -> Any:
    return jpype.JClass("org.locationtech.jts.io.WKBReader")().read(jpype.JArray(jpype.JByte)(bytes.fromhex(wkb_hex)))


def _measurements(obj: Any) -> dict[str, float]:
    ml = obj.getMeasurementList()
    return {str(k): float(ml.get(k)) for k in ml.getNames()}


def _object_type(obj: Any) -> str:
    if obj.isCell():
        return "cell"
    if obj.isDetection():
        return "detection"
    if obj.isAnnotation():
        return "annotation"
    return str(obj.getClass().getSimpleName())


def describe(jpype: Any, obj: Any) -> dict[str, Any]:
    """One QuPath object as JSON: type, id, class, ROI (hex WKB, JTS validity), nucleus, measurements."""
    roi = obj.getROI()
    geom = roi.getGeometry()
    pc = obj.getPathClass()
    d: dict[str, Any] = {
        "type": _object_type(obj),
        "java_class": str(obj.getClass().getSimpleName()),
        "id": str(obj.getID()),
        "class": None if pc is None else str(pc.toString()),
        "roi_type": str(roi.getRoiName()),
        "wkb": _wkb_hex(jpype, geom),
        "valid": bool(geom.isValid()),
        "measurements": _measurements(obj),
    }
    if obj.isCell():
        nuc = obj.getNucleusROI()
        d["nucleus_wkb"] = None if nuc is None else _wkb_hex(jpype, nuc.getGeometry())
        d["nucleus_valid"] = None if nuc is None else bool(nuc.getGeometry().isValid())
    return d


def cmd_dump_project(args: argparse.Namespace) -> dict[str, Any]:
    """Every object of every image of a project, read with QuPath's classes (mode "r": nothing written)."""
    from paquo.projects import QuPathProject

    jpype = _java()
    images = []
    with QuPathProject(args.project, mode="r") as qp:
        for entry in qp.images:
            h = entry.hierarchy.java_object
            objs = [describe(jpype, o) for o in h.getAllObjects(False)]
            images.append({"name": entry.image_name, "width": int(entry.width), "height": int(entry.height),
                           "objects": objs})
    return {"images": images}


def cmd_build_project(args: argparse.Namespace) -> dict[str, Any]:
    """A new project from a JSON spec: ``{"project": DIR, "images": [{"path": TIFF, "objects": [{"type":
    "annotation"|"detection", "class": NAME, "wkt": WKT}, ...]}, ...]}``. Returns each image's objects
    as :func:`describe` gives them."""
    from paquo.classes import QuPathPathClass
    from paquo.images import QuPathImageType
    from paquo.projects import QuPathProject
    from shapely import wkt

    jpype = _java()
    spec = json.loads(Path(args.spec).read_text(encoding="utf-8"))
    out = []
    with QuPathProject(spec["project"], mode="x") as qp:
        for im in spec["images"]:
            entry = qp.add_image(im["path"], image_type=QuPathImageType.BRIGHTFIELD_H_E)
            objs = []
            for o in im.get("objects", []):
                add = entry.hierarchy.add_annotation if o["type"] == "annotation" else entry.hierarchy.add_detection
                objs.append(add(wkt.loads(o["wkt"]), path_class=QuPathPathClass(o["class"])).java_object)
            out.append({"name": entry.image_name, "width": int(entry.width), "height": int(entry.height),
                        "objects": [describe(jpype, o) for o in objs]})
    return {"images": out}


def cmd_read_geojson(args: argparse.Namespace) -> dict[str, Any]:
    """Each file read by ``qupath.lib.io.PathIO.readObjects`` (File > Import objects): the objects, or the error."""
    jpype = _java()
    PathIO = jpype.JClass("qupath.lib.io.PathIO")
    File = jpype.JClass("java.io.File")
    files = {}
    for f in args.files:
        try:
            objs = PathIO.readObjects(File(str(Path(f).resolve())).toPath())
            files[f] = {"objects": [describe(jpype, o) for o in objs], "error": None}
        except jpype.JException as err:
            files[f] = {"objects": [], "error": f"{err.getClass().getName()}: {err.getMessage()}"}
    return {"files": files}


def watershed(jpype: Any, image: Path, params: dict[str, Any], threads: int = 0) -> dict[str, Any]:
    """QuPath's own cell detection (``WatershedCellDetection``) on the whole of a TIFF/PNG read by
    QuPath's ImageJ server, as brightfield H&E, with ``params`` over :data:`WATERSHED_DEFAULTS` and a
    ``CommandLineTaskRunner`` of ``threads`` (0: QuPath's default). Every cell's measurements, ROI and
    nucleus ROI, the seconds ``runPlugin`` took, and ``qupath_defaults``: the plugin's own default
    parameter list for this image, as QuPath's dialog would show it."""
    J = jpype.JClass
    image = Path(image).resolve()
    server = J("qupath.imagej.images.servers.ImageJServer")(J("java.net.URI")(image.as_uri()), jpype.JArray(jpype.JString)([]))
    data = J("qupath.lib.images.ImageData")(server, J("qupath.lib.images.ImageData$ImageType").BRIGHTFIELD_H_E)
    plane = J("qupath.lib.regions.ImagePlane").getDefaultPlane()
    whole = J("qupath.lib.roi.ROIs").createRectangleROI(0, 0, server.getWidth(), server.getHeight(), plane)
    annotation = J("qupath.lib.objects.PathObjects").createAnnotationObject(whole)
    hierarchy = data.getHierarchy()
    hierarchy.addObject(annotation)
    hierarchy.getSelectionModel().setSelectedObject(annotation)
    params = {**WATERSHED_DEFAULTS, **params}
    plugin = J("qupath.imagej.detect.cells.WatershedCellDetection")()
    defaults = plugin.getDefaultParameterList(data).getKeyValueParameters(False)
    runner = J("qupath.lib.plugins.CommandLineTaskRunner")
    t0 = time.perf_counter()
    ok = plugin.runPlugin(runner(threads) if threads > 0 else runner(), data, json.dumps(params))
    seconds = time.perf_counter() - t0
    cal = server.getPixelCalibration()
    cells = [describe(jpype, o) for o in hierarchy.getDetectionObjects()]
    return {"ok": bool(ok), "seconds": seconds, "params": params, "width": int(server.getWidth()),
            "height": int(server.getHeight()),
            "pixel_size_um": float(cal.getAveragedPixelSizeMicrons()) if cal.hasPixelSizeMicrons() else None,
            "qupath_defaults": {str(k): _plain(defaults.get(k)) for k in defaults.keySet()},
            "cells": cells}


def _plain(value: Any) -> Any:
    """A Java parameter value as JSON (booleans, numbers, else its text)."""
    text = str(value)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return float(text)
    except ValueError:
        return text


def cmd_watershed(args: argparse.Namespace) -> dict[str, Any]:
    """QuPath's own cell detection (``WatershedCellDetection``) on the whole of a TIFF/PNG (:func:`watershed`)."""
    return watershed(_java(), Path(args.image), json.loads(args.params), args.threads)


def cmd_shape_measurements(args: argparse.Namespace) -> dict[str, Any]:
    """QuPath's shape features (``ObjectMeasurements.addShapeMeasurements``, *Add shape features*) of
    objects given as JSON ``{"pixel_size_um": S or null, "objects": [{"type": "detection"|"cell",
    "wkb": HEX, "nucleus_wkb": HEX}, ...]}``: each object's measurements as QuPath names them."""
    jpype = _java()
    J = jpype.JClass
    spec = json.loads(Path(args.spec).read_text(encoding="utf-8"))
    plane = J("qupath.lib.regions.ImagePlane").getDefaultPlane()
    tools, objects = J("qupath.lib.roi.GeometryTools"), J("qupath.lib.objects.PathObjects")
    s = spec.get("pixel_size_um")
    PixelCalibration = J("qupath.lib.images.servers.PixelCalibration")
    cal = (PixelCalibration.Builder().pixelSizeMicrons(float(s), float(s)).build() if s
           else PixelCalibration.getDefaultInstance())
    made = []
    for o in spec["objects"]:
        roi = tools.geometryToROI(_geometry(jpype, o["wkb"]), plane)
        if o["type"] == "cell":
            nucleus = tools.geometryToROI(_geometry(jpype, o["nucleus_wkb"]), plane)
            made.append(objects.createCellObject(roi, nucleus, None, None))
        else:
            made.append(objects.createDetectionObject(roi))
    features = J("qupath.lib.analysis.features.ObjectMeasurements$ShapeFeatures").values()
    J("qupath.lib.analysis.features.ObjectMeasurements").addShapeMeasurements(
        J("java.util.ArrayList")(made), cal, features)
    return {"objects": [_measurements(o) for o in made], "features": [str(f) for f in features]}


def cmd_python(args: argparse.Namespace) -> dict[str, Any]:
    """Run Python code (``-c``) that may start QuPath; it answers through ``answer(obj)``."""
    box: dict[str, Any] = {}
    exec(compile(args.code, "<qupath-kit>", "exec"), {"__name__": "__qupath_kit__", "answer": lambda obj: box.update(answer=obj)})
    return box


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--out", required=True, help="where to write the JSON answer")
    sub = ap.add_subparsers(dest="command", required=True)
    commands = {
        "dump-project": (cmd_dump_project, [("project", {})]),
        "build-project": (cmd_build_project, [("spec", {})]),
        "read-geojson": (cmd_read_geojson, [("files", {"nargs": "+"})]),
        "watershed": (cmd_watershed, [("image", {}), ("--params", {"default": "{}", "help": "JSON over WATERSHED_DEFAULTS"}),
                                     ("--threads", {"type": int, "default": 0, "help": "0: QuPath's default"})]),
        "shape-measurements": (cmd_shape_measurements, [("spec", {})]),
        "python": (cmd_python, [("-c", {"dest": "code", "required": True})]),
    }
    for name, (fn, arguments) in commands.items():
        p = sub.add_parser(name, parents=[out], help=(fn.__doc__ or "").splitlines()[0])
        for arg, kw in arguments:
            p.add_argument(arg, **kw)
        p.set_defaults(fn=fn)
    args = ap.parse_args(argv)
    result = args.fn(args)
    Path(args.out).write_text(json.dumps(result, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main()
