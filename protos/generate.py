"""Regenerate the checked-in Python stubs from the .proto files in protos/.

Equivalent to running, from the repository root::

    python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. \
        fleetserve/protos/grpc_service.proto fleetserve/protos/model_config.proto \
        fleetserve/protos/health.proto

Usage: ``python -m fleetserve.protos.generate [OUT_DIR]``. The stubs are written to
``OUT_DIR/fleetserve/protos/`` (default: the repository root, i.e. in place, through
the ``fleetserve/protos`` link). The proto files are compiled under their installed
names (``fleetserve/protos/...``), so the generated modules import each other as
``fleetserve.protos.model_config_pb2``.
No ``*_pb2_grpc.py`` is generated: the server registers its handlers under the
wire service names itself (see protos/README.md).
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_FILES = tuple(
    f"fleetserve/protos/{name}.proto" for name in ("grpc_service", "model_config", "health")
)
GENERATE_COMMAND = " ".join(
    ("python -m grpc_tools.protoc -I . --python_out=. --pyi_out=.", *PROTO_FILES)
)


def protoc_args(out_dir: Path) -> list[str]:
    """The protoc arguments for writing the stubs under ``out_dir``."""
    out = str(out_dir)
    # `python -m grpc_tools.protoc` appends the bundled well-known-types include
    # directory; do the same so both routes compile identically.
    well_known = resources.files("grpc_tools") / "_proto"
    return [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        # Absolute paths under the -I root map to their relative names ("protos/...").
        *(str(REPO_ROOT / name) for name in PROTO_FILES),
        f"-I{well_known}",
    ]


def generated_names() -> list[str]:
    """File names (inside protos/) that the generator writes."""
    stems = [Path(proto).stem for proto in PROTO_FILES]
    return sorted(f"{stem}_pb2.{ext}" for stem in stems for ext in ("py", "pyi"))


def generate(out_dir: str | Path | None = None) -> list[Path]:
    """Run protoc; return the paths of the generated files."""
    out = Path(out_dir) if out_dir is not None else REPO_ROOT
    (out / "fleetserve" / "protos").mkdir(parents=True, exist_ok=True)
    rc = protoc.main(protoc_args(out))
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    return [out / "fleetserve" / "protos" / name for name in generated_names()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print("usage: python -m fleetserve.protos.generate [OUT_DIR]", file=sys.stderr)
        return 2
    for path in generate(argv[0] if argv else None):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
