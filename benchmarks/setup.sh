#!/usr/bin/env bash
# The benchmarks' tools; idempotent (what is there already is kept). A developer tool: CI
# never runs it. Needs root (or sudo) for apt-get, and pip reaching PyPI.
#
# - wrk (REST) and h2load (gRPC; Debian's nghttp2-client, which also brings nghttp for the
#   frame check): benchmarks/loadtest.py and cpu_per_request.py.
# - Triton's perf_analyzer, for benchmarks/perf_analyzer.py, into benchmarks/out/perf_analyzer/
#   (ignored by git): the `perf-analyzer` wheels (2.58 and later) need glibc 2.38, newer than
#   Debian 12's, so the binary comes from the tritonclient 2.50.0 wheel, which runs here once
#   libb64 (apt: libb64-0d) and libcudart.so.12 (the nvidia-cuda-runtime-cu12 wheel; loaded,
#   never used without a GPU) are found. `perf_analyzer` there is a wrapper that points the
#   loader at that copy of libcudart. PYTHON (default python3) runs pip.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PA_DIR="$HERE/out/perf_analyzer"
PYTHON="${PYTHON:-python3}"
TRITONCLIENT="tritonclient==2.50.0"
CUDART="nvidia-cuda-runtime-cu12==12.6.77"  # the CUDA 12.6 of Triton 24.09 (= 2.50.0)

missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
ldconfig -p | grep -q 'libb64\.so\.0d' || missing+=(libb64-0d)
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    echo "installing: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
echo "wrk: $(command -v wrk); h2load: $(command -v h2load)"

if [ ! -x "$PA_DIR/libexec/perf_analyzer" ] || [ ! -e "$PA_DIR/lib/libcudart.so.12" ]; then
    if [ "$(uname -sm)" != "Linux x86_64" ]; then
        echo "perf_analyzer: the tritonclient 2.50.0 wheel's binary is for Linux x86_64 only" >&2
        exit 1
    fi
    wheels="$(mktemp -d)"
    trap 'rm -rf "$wheels"' EXIT
    echo "downloading $TRITONCLIENT and $CUDART (wheels, no dependencies)"
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$wheels" "$TRITONCLIENT" "$CUDART"
    mkdir -p "$PA_DIR/libexec" "$PA_DIR/lib"
    # pull the two files out of the wheels (zip archives) with Python: no unzip needed
    "$PYTHON" - "$wheels" "$PA_DIR" <<'EOF'
import pathlib, shutil, sys, zipfile

wheels, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wanted = {"data/bin/perf_analyzer": out / "libexec" / "perf_analyzer",
          "cuda_runtime/lib/libcudart.so.12": out / "lib" / "libcudart.so.12"}
for wheel in wheels.glob("*.whl"):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            for suffix, dest in wanted.items():
                if name.endswith(suffix):
                    with z.open(name) as src, open(dest, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    dest.chmod(0o755)
missing = [str(d) for d in wanted.values() if not d.exists()]
if missing:
    sys.exit(f"not found in the wheels: {missing}")
EOF
    echo "perf_analyzer from $TRITONCLIENT, libcudart from $CUDART" > "$PA_DIR/VERSION"
fi

cat > "$PA_DIR/perf_analyzer" <<'EOF'
#!/bin/sh
# perf_analyzer from the tritonclient 2.50.0 wheel, with its libcudart.so.12 (benchmarks/setup.sh)
dir="$(cd "$(dirname "$0")" && pwd)"
LD_LIBRARY_PATH="$dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$dir/libexec/perf_analyzer" "$@"
EOF
chmod +x "$PA_DIR/perf_analyzer"
# a missing library would show here, not in the middle of a benchmark
"$PA_DIR/perf_analyzer" --version
echo "perf_analyzer: $PA_DIR/perf_analyzer ($(cat "$PA_DIR/VERSION"))"
