#!/usr/bin/env bash
# Install the native load generators used by benchmarks/loadtest.py: wrk (REST) and h2load
# (gRPC; Debian package nghttp2-client, which also brings nghttp for the frame check).
# Needs root and Debian's package archive. A developer tool: CI never runs it.
set -euo pipefail

missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
if [ ${#missing[@]} -eq 0 ]; then
    echo "wrk and h2load already installed: $(command -v wrk) $(command -v h2load)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "installing: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
wrk -v 2>&1 | head -1 || true
h2load --version
