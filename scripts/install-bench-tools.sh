#!/usr/bin/env bash
# Installs what `make bench` measures against, when missing:
#
#   wrk        the HTTP load generator (Debian package `wrk`)
#   wasmtime   the wasmtime CLI pinned to the engine Patchbay embeds (48.0.8), built once
#              with `cargo install --locked` into ~/.cache/patchbay/wasmtime-cli (a long
#              build: ~15 min on 2 cores; the cache outside the clone keeps it)
#
# Prints nothing when both are there. Exits non-zero saying what to do otherwise.
set -euo pipefail

WASMTIME_VERSION="48.0.8"
cache="${PATCHBAY_CACHE:-$HOME/.cache/patchbay}"
wasmtime_root="$cache/wasmtime-cli"
wasmtime="$wasmtime_root/bin/wasmtime"

die() {
    echo "install-bench-tools: $*" >&2
    exit 1
}

if ! command -v wrk >/dev/null 2>&1; then
    echo "install-bench-tools: installing wrk (apt-get)" >&2
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get install -y wrk >/dev/null 2>&1 \
        || { $sudo_cmd apt-get update >/dev/null 2>&1 && $sudo_cmd apt-get install -y wrk >/dev/null 2>&1; } \
        || die "could not install wrk: apt-get install wrk"
fi

if [ ! -x "$wasmtime" ] || ! "$wasmtime" --version 2>/dev/null | grep -q " $WASMTIME_VERSION"; then
    echo "install-bench-tools: building wasmtime-cli $WASMTIME_VERSION into $wasmtime_root (once; long)" >&2
    cargo install wasmtime-cli --version "$WASMTIME_VERSION" --locked \
        --root "$wasmtime_root" --target-dir "$cache/target-wasmtime-cli" >&2 \
        || die "cargo install wasmtime-cli --version $WASMTIME_VERSION failed"
fi
