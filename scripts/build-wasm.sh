#!/usr/bin/env bash
# Build the guest workspaces (functions/ and tests/components/) into wasm32-wasip2
# components, release profile, and copy each to build/components/<package>.wasm, checking
# that every file starts with the component magic `00 61 73 6d 0d 00 01 00`. Also writes
# build/components/core-module.wasm, a valid *core* module (not a component) for the
# host's "refuses a core module" test (see tests/components/core-module/README.md).
#
# Usage:
#   scripts/build-wasm.sh [all] [--route auto|a|b]
#       everything, through route A if it works, else route B (PATCHBAY_WASM_ROUTE too)
#   scripts/build-wasm.sh route-b [PACKAGE...]
#       force route B (Debian compiler + build-std) for PACKAGE (default: echo) into
#       build/components-route-b/<package>.wasm, so that route cannot rot unnoticed
#   scripts/build-wasm.sh test
#       run the guest workspaces' unit tests natively (SDK helpers, function logic) with
#       the host's toolchain; nothing there needs a component runtime
#
# Environment:
#   PATCHBAY_WASM_TARGET_DIR   cargo target dir for the guest builds (default:
#                              ${CARGO_TARGET_DIR:-<repo>/target}/wasm, and ...-route-b
#                              for route B); never the host's own debug/release dirs, so a
#                              guest build never waits on the host build's lock
#   PATCHBAY_WASM_ROUTE        auto (default), a or b
#   PATCHBAY_COMPONENTS        output dir (default <repo>/build/components)
#   PATCHBAY_COMPONENTS_ROUTE_B  output dir of `route-b` (default
#                              <repo>/build/components-route-b)
#   PATCHBAY_TOOLS             where route B keeps its downloads (default <repo>/.tools)
#
# Package names use hyphens only: cargo names the artifact `foo_bar.wasm`, copied back to
# `foo-bar.wasm`.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/wasm-toolchain.sh
source "$ROOT/scripts/wasm-toolchain.sh"

WORKSPACES=("$ROOT/functions" "$ROOT/tests/components")
OUT_DIR="${PATCHBAY_COMPONENTS:-$ROOT/build/components}"
ROUTE_B_OUT_DIR="${PATCHBAY_COMPONENTS_ROUTE_B:-$ROOT/build/components-route-b}"
COMPONENT_MAGIC=0061736d0d000100
CORE_MAGIC=0061736d01000000

say() { echo "build-wasm: $*" >&2; }

magic_of() { od -An -tx1 -N8 "$1" | tr -d ' \n'; }

# Cargo packages of `$1` (a workspace dir) that build a cdylib, i.e. a component.
component_packages() {
    local manifest
    for manifest in "$1"/*/Cargo.toml; do
        [[ -f "$manifest" ]] || continue
        grep -q '"cdylib"' "$manifest" || continue
        sed -n 's/^name *= *"\(.*\)"/\1/p' "$manifest" | head -n 1
    done
}

# The workspace directory holding package `$1`.
workspace_of() {
    local ws
    for ws in "${WORKSPACES[@]}"; do
        if [[ -f "$ws/$1/Cargo.toml" ]]; then
            echo "$ws"
            return 0
        fi
    done
    wasm_die "no guest package named '$1' under functions/ or tests/components/"
}

# cargo build --release in workspace `$1` for packages `${@:2}` (all when none), with the
# toolchain chosen by wasm_toolchain_ensure, into target dir $TARGET_DIR.
cargo_build() {
    local ws="$1"
    shift
    local select=()
    local p
    for p in "$@"; do select+=(-p "$p"); done
    local started=$SECONDS
    say "route $WASM_ROUTE: building ${*:-all packages} in ${ws#"$ROOT"/}"
    (cd "$ws" && env "${WASM_ENV[@]}" CARGO_TARGET_DIR="$TARGET_DIR" \
        "${WASM_CARGO[@]}" build --release "${select[@]}") ||
        wasm_die "cargo build failed in ${ws#"$ROOT"/} (route $WASM_ROUTE)"
    say "route $WASM_ROUTE: ${ws#"$ROOT"/} built in $((SECONDS - started)) s"
}

# Copies package `$1`'s component to `$2`/<package>.wasm and checks its magic.
install_component() {
    local pkg="$1" dest_dir="$2"
    local src="$TARGET_DIR/wasm32-wasip2/release/${pkg//-/_}.wasm"
    [[ -f "$src" ]] || wasm_die "expected $src after building $pkg"
    local magic
    magic="$(magic_of "$src")"
    [[ "$magic" == "$COMPONENT_MAGIC" ]] ||
        wasm_die "$src is not a component: starts with $magic, expected $COMPONENT_MAGIC"
    mkdir -p "$dest_dir"
    # Copy then rename, so a reader never sees a half-written component.
    cp "$src" "$dest_dir/.$pkg.wasm.tmp"
    mv -f "$dest_dir/.$pkg.wasm.tmp" "$dest_dir/$pkg.wasm"
    printf '  %-44s %8d bytes\n' "${dest_dir#"$ROOT"/}/$pkg.wasm" "$(stat -c %s "$dest_dir/$pkg.wasm")" >&2
}

# A minimal valid core module: one function `handle: func()` that returns. Equivalent WAT:
#   (module (func (export "handle")))
write_core_module() {
    local dest="$OUT_DIR/core-module.wasm"
    mkdir -p "$OUT_DIR"
    {
        printf '\x00\x61\x73\x6d\x01\x00\x00\x00' # magic, version 1
        printf '\x01\x04\x01\x60\x00\x00'           # type section: [func () -> ()]
        printf '\x03\x02\x01\x00'                   # function section: [type 0]
        printf '\x07\x0a\x01\x06handle\x00\x00'     # export section: "handle" = func 0
        printf '\x0a\x04\x01\x02\x00\x0b'           # code section: [no locals, end]
    } >"$dest.tmp"
    mv -f "$dest.tmp" "$dest"
    [[ "$(magic_of "$dest")" == "$CORE_MAGIC" ]] || wasm_die "$dest: wrong core module magic"
    printf '  %-44s %8d bytes\n' "${dest#"$ROOT"/}" "$(stat -c %s "$dest")" >&2
}

build_all() {
    local route="$1"
    wasm_toolchain_ensure "$route"
    local base="${PATCHBAY_WASM_TARGET_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/wasm}"
    # The two routes use different compilers (and route B rebuilds std): keep them apart.
    if [[ "$WASM_ROUTE" == b ]]; then TARGET_DIR="$base-route-b"; else TARGET_DIR="$base"; fi
    local ws pkg packages=()
    for ws in "${WORKSPACES[@]}"; do
        cargo_build "$ws"
    done
    say "components (route $WASM_ROUTE):"
    for ws in "${WORKSPACES[@]}"; do
        mapfile -t packages < <(component_packages "$ws")
        for pkg in "${packages[@]}"; do
            install_component "$pkg" "$OUT_DIR"
        done
    done
    write_core_module
}

build_route_b() {
    local packages=("$@")
    [[ ${#packages[@]} -gt 0 ]] || packages=(echo)
    wasm_toolchain_ensure b
    local base="${PATCHBAY_WASM_TARGET_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/wasm}"
    TARGET_DIR="$base-route-b"
    local pkg ws
    for pkg in "${packages[@]}"; do
        # workspace_of reports an unknown package; a failed substitution stops us here.
        ws="$(workspace_of "$pkg")" || exit 1
        cargo_build "$ws" "$pkg"
    done
    say "components (route b):"
    for pkg in "${packages[@]}"; do
        install_component "$pkg" "$ROUTE_B_OUT_DIR"
    done
}

run_native_tests() {
    wasm_clean_env
    local base="${PATCHBAY_WASM_TARGET_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/wasm}"
    say "unit tests of functions/ (native)"
    (cd "$ROOT/functions" && CARGO_TARGET_DIR="$base-native-tests" cargo test) ||
        wasm_die "unit tests of functions/ failed"
}

main() {
    local command=all route="${PATCHBAY_WASM_ROUTE:-auto}" args=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            all | route-b | test) command="$1"; shift ;;
            --route) route="${2:?--route needs a value: auto, a or b}"; shift 2 ;;
            --route=*) route="${1#--route=}"; shift ;;
            -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; return 0 ;;
            -*) wasm_die "unknown option '$1' (see --help)" ;;
            *) args+=("$1"); shift ;;
        esac
    done
    case "$command" in
        all)
            [[ ${#args[@]} -eq 0 ]] || wasm_die "'all' takes no packages (got ${args[*]})"
            build_all "$route"
            ;;
        route-b)
            build_route_b "${args[@]}"
            ;;
        test)
            [[ ${#args[@]} -eq 0 ]] || wasm_die "'test' takes no packages (got ${args[*]})"
            run_native_tests
            ;;
    esac
}

main "$@"
