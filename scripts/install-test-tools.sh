#!/usr/bin/env bash
# Installs the checkers the integration tests run against Patchbay's own output:
#
#   openapi-spec-validator   validates the gateway's /openapi.json (OpenAPI 3.1); pip, into
#                            the same virtual environment as nats-server (<repo>/.tools/venv)
#   schemathesis             property-based API testing: generates requests from that
#                            /openapi.json and checks every answer against the spec (pip)
#   promtool, prometheus     Debian package `prometheus` (apt-get): `promtool check metrics`
#                            lints every binary's /metrics, and a real Prometheus server
#                            scrapes them all
#
# Idempotent and quiet when everything is there. Exits non-zero, saying what to do, when
# it cannot install something: a test that needs a checker never skips silently.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="${PATCHBAY_TOOLS:-$repo/.tools}"
venv="$tools/venv"

die() {
    echo "install-test-tools: $*" >&2
    exit 1
}

if [ ! -x "$venv/bin/pip" ]; then
    command -v python3 >/dev/null 2>&1 || die "python3 is required (apt-get install python3 python3-venv)"
    mkdir -p "$tools"
    python3 -m venv "$venv" >/dev/null 2>&1 \
        || die "could not create a virtual environment at $venv (apt-get install python3-venv)"
fi

if [ ! -x "$venv/bin/openapi-spec-validator" ]; then
    echo "install-test-tools: installing openapi-spec-validator into $venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check "openapi-spec-validator>=0.7" >&2 \
        || die "pip could not install openapi-spec-validator (is PyPI reachable?)"
fi
"$venv/bin/openapi-spec-validator" --help >/dev/null 2>&1 \
    || die "$venv/bin/openapi-spec-validator does not run"

if [ ! -x "$venv/bin/schemathesis" ]; then
    echo "install-test-tools: installing schemathesis into $venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis>=4.1,<5" >&2 \
        || die "pip could not install schemathesis (is PyPI reachable?)"
fi
"$venv/bin/schemathesis" --version >/dev/null 2>&1 \
    || die "$venv/bin/schemathesis does not run"

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 \
        || die "promtool and prometheus are missing and apt-get is not available; install the Prometheus 2.x binaries on PATH"
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "installing the Debian prometheus package needs root (or sudo)"
        sudo="sudo"
    fi
    echo "install-test-tools: installing the Debian prometheus package (promtool, prometheus)" >&2
    # The package may try to start its systemd service; without systemd (containers) that
    # fails harmlessly — the tests start their own server with a temporary config.
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >&2 \
        || die "apt-get could not install prometheus (run apt-get update first?)"
fi
promtool --version >/dev/null 2>&1 || die "promtool is on PATH but does not run"
prometheus --version >/dev/null 2>&1 || die "prometheus is on PATH but does not run"
