#!/usr/bin/env bash
# Installs the checkers the integration tests run against Patchbay's own output, into the
# same Python virtual environment as nats-server (<repo>/.tools/venv):
#
#   openapi-spec-validator   validates the gateway's /openapi.json (OpenAPI 3.1)
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
