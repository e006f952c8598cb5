"""Regenerate the example model repository shipped in examples/models.

The models are built from code (loaders.testing) instead of being hand-edited binaries, so
they can be reviewed and reproduced; seeds are fixed, so rerunning gives identical bytes.

Usage (from the repository root; needs the ``onnx`` package, e.g. from the ``bench`` or
``test`` extra)::

    python examples/make_models.py            # rewrite examples/models
    python examples/make_models.py --out DIR  # write the same repository elsewhere

It writes only its own files and never deletes anything (see ``generate``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    # Works from a plain checkout too; with the project pip-installed this is harmless.
    sys.path.insert(0, str(ROOT))

from fleetserve.loaders import testing  # noqa: E402
from fleetserve.server.files import write_atomically  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "models"
NEEDS_ONNX = (
    "make_models.py builds the models with the onnx package, which fleetserve itself does not "
    "need: install it with `pip install onnx`, or from a checkout `pip install -e '.[bench]'` "
    "(or '.[test]')"
)

SIMPLE_CONFIG = """\
name: "simple"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  {
    name: "INPUT0"
    data_type: TYPE_INT32
    dims: [ 16 ]
  },
  {
    name: "INPUT1"
    data_type: TYPE_INT32
    dims: [ 16 ]
  }
]
output [
  {
    name: "OUTPUT0"
    data_type: TYPE_INT32
    dims: [ 16 ]
  },
  {
    name: "OUTPUT1"
    data_type: TYPE_INT32
    dims: [ 16 ]
  }
]
"""

# name -> list of (version, model bytes factory, config.pbtxt or None)
MODELS = {
    "simple": [(1, lambda: testing.add_sub("INT32", 16), SIMPLE_CONFIG)],
    "mlp": [
        (1, lambda: testing.mlp(16, 64, 4, seed=1), None),
        (2, lambda: testing.mlp(16, 64, 4, seed=2), None),
    ],
    "identity_fp32": [(1, lambda: testing.identity("FP32", (-1, 4)), None)],
    "identity_bytes": [(1, lambda: testing.identity("BYTES", (-1, 4)), None)],
}


def generate(out: Path) -> list[tuple[Path, bool]]:
    """Write every example model under ``out``: (file, whether its bytes changed) each.

    Only its own files are written (each version's model.onnx and the configs above), each
    atomically and only when its bytes change, and nothing is ever deleted: a server may be
    serving ``out``, and versions or configs uploaded to it are not ours to remove. A
    version or config dropped from MODELS is therefore removed by hand (``git rm``).
    """
    files = []
    for name, versions in MODELS.items():
        for version, build, config in versions:
            files.append(_write(out / name / str(version) / "model.onnx", build()))
            if config is not None:
                files.append(_write(out / name / "config.pbtxt", config.encode()))
    return files


def _write(path: Path, data: bytes) -> tuple[Path, bool]:
    changed = not path.is_file() or path.read_bytes() != data
    if changed:
        write_atomically(path, data)
    return path, changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="repository directory")
    args = parser.parse_args(argv)
    try:
        import onnx  # noqa: F401  (the server itself never needs it)
    except ModuleNotFoundError:
        print(NEEDS_ONNX, file=sys.stderr)
        return 1
    for path, changed in generate(args.out):
        print(f"{path.stat().st_size:7d}  {path}  {'written' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
