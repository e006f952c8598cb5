"""Regenerate the example model repository shipped in examples/models.

The models are built from code (loaders.testing) instead of being hand-edited binaries, so
they can be reviewed and reproduced; seeds are fixed, so rerunning gives identical bytes.

Usage (from the repository root; needs the ``onnx`` package from the ``test`` extra)::

    python examples/make_models.py            # rewrite examples/models
    python examples/make_models.py --out DIR  # write the same repository elsewhere
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    # Works from a plain checkout too; with the project pip-installed this is harmless.
    sys.path.insert(0, str(ROOT))

from fleetserve.loaders import testing  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "models"

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


def generate(out: Path) -> list[Path]:
    """Write every example model under ``out``; returns the files written."""
    written = []
    for name, versions in MODELS.items():
        # Start clean so stale versions or configs cannot linger after an edit here.
        shutil.rmtree(out / name, ignore_errors=True)
        for version, build, config in versions:
            path = testing.write_model(out, name, build(), version=version, config=config)
            written.append(path)
            if config is not None:
                written.append(path.parent.parent / "config.pbtxt")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="repository directory")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(f"{path.stat().st_size:7d}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
