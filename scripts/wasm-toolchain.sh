#!/usr/bin/env bash
# WASM_ROUTE, WASM_CARGO and WASM_ENV are read by the scripts that source this one.
# shellcheck disable=SC2034
# Make wasm32-wasip2 builds work on this machine, idempotently.
#
# Two routes (see the project's wasm toolchain notes):
#   A  rustup's `wasm32-wasip2` target for the default toolchain (fast; needs rustup and its
#      download server).
#   B  Debian packages: rustc-web/cargo-web 1.96 + rust-web-src (for -Zbuild-std) +
#      rust-web-llvm (wasm-component-ld) + lld-NN (wasm-ld) + a wasi libc. The libc is
#      Debian trixie's `wasi-libc` (it has a real wasm32-wasip2 build), fetched through a
#      private apt configuration under .tools/wasm/ and unpacked there; the system's apt
#      sources are left untouched. Bookworm's preview1 `wasi-libc` is the fallback.
#
# Usage:
#   scripts/wasm-toolchain.sh [--route auto|a|b] [--quiet]
#   PATCHBAY_WASM_ROUTE=b scripts/wasm-toolchain.sh
#
# `auto` (the default) tries A and falls back to B. The script only prints what it decided;
# scripts/build-wasm.sh sources it and calls `wasm_toolchain_ensure` to get the build
# command and environment for the chosen route.
#
# Sourced, it defines (and changes nothing until a function is called):
#   wasm_toolchain_ensure ROUTE   sets WASM_ROUTE (a|b), WASM_CARGO (array: the cargo
#                                 command) and WASM_ENV (array: VAR=value for `env`)
#   wasm_die MESSAGE              prints MESSAGE and exits 1

set -euo pipefail

WASM_TOOLCHAIN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Everything route B downloads lives here (the repo's .tools/ is git-ignored; the
# Makefile exports PATCHBAY_TOOLS).
WASM_TOOLS_DIR="${PATCHBAY_TOOLS:-$WASM_TOOLCHAIN_ROOT/.tools}/wasm"
WASM_QUIET="${WASM_QUIET:-0}"

# Packages of route B. rustc-web conflicts with Debian's old rustc/cargo 1.63, which cannot
# build wit-bindgen anyway (it needs Rust >= 1.85).
WASM_ROUTE_B_PACKAGES=(rustc-web cargo-web rust-web-src rust-web-llvm)

wasm_say() {
    if [[ "$WASM_QUIET" != 1 ]]; then
        echo "wasm-toolchain: $*" >&2
    fi
}

wasm_die() {
    echo "wasm-toolchain: error: $*" >&2
    exit 1
}

# Variables a calling cargo build script or Makefile may have set for the *host* build;
# they would leak host flags or another compiler into the guest build.
wasm_clean_env() {
    unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS RUSTDOCFLAGS \
        RUSTC RUSTC_WRAPPER RUSTC_WORKSPACE_WRAPPER CARGO_BUILD_TARGET \
        CARGO_TARGET_WASM32_WASIP2_RUSTFLAGS CARGO_TARGET_WASM32_WASIP2_LINKER \
        CARGO_UNSTABLE_BUILD_STD RUSTC_BOOTSTRAP
}

# True when `$1` (a rustc) has a std for wasm32-wasip2.
wasm_has_wasip2_std() {
    local libdir
    libdir="$("$1" --print target-libdir --target wasm32-wasip2 2>/dev/null)" || return 1
    compgen -G "$libdir/libstd-*.rlib" >/dev/null
}

# ---------------------------------------------------------------------------- route A

wasm_route_a() {
    if ! command -v rustup >/dev/null 2>&1 || ! command -v cargo >/dev/null 2>&1; then
        wasm_say "route A unavailable: rustup/cargo not on PATH"
        return 1
    fi
    if ! wasm_has_wasip2_std rustc; then
        wasm_say "route A: adding the wasm32-wasip2 target with rustup (timeout 120 s)"
        # A hang (no route to the download server) counts as failure, hence the timeout.
        if ! timeout 120 rustup target add wasm32-wasip2 >&2; then
            wasm_say "route A failed: 'rustup target add wasm32-wasip2' did not succeed"
            return 1
        fi
        if ! wasm_has_wasip2_std rustc; then
            wasm_say "route A failed: no libstd-*.rlib for wasm32-wasip2 after rustup"
            return 1
        fi
    fi
    WASM_ROUTE=a
    WASM_CARGO=(cargo)
    WASM_ENV=(CARGO_BUILD_TARGET=wasm32-wasip2)
    wasm_say "route A: $(rustc --version) with rustup's wasm32-wasip2 std"
}

# ---------------------------------------------------------------------------- route B

wasm_sudo() {
    if [[ "$(id -u)" == 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        wasm_die "route B needs root to run: $*"
    fi
}

wasm_pkg_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

WASM_APT_UPDATED=0
wasm_apt_install() {
    local missing=() p
    for p in "$@"; do
        wasm_pkg_installed "$p" || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    wasm_say "route B: installing ${missing[*]} with apt-get"
    if [[ "$WASM_APT_UPDATED" == 0 ]]; then
        wasm_sudo apt-get update >&2 || wasm_die "'apt-get update' failed"
        WASM_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive wasm_sudo apt-get install -y --no-install-recommends \
        "${missing[@]}" >&2 ||
        wasm_die "'apt-get install ${missing[*]}' failed (route B needs Debian bookworm-security's rustc-web 1.96)"
}

# The first Debian mirror URI in the machine's own apt sources (deb822 or one-line format),
# so the private trixie configuration uses the same mirror, proxy and all.
wasm_debian_mirror() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] || continue
        uri="$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f")"
        [[ -n "$uri" ]] && { echo "$uri"; return 0; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f "$f" ]] || continue
        uri="$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { if ($i !~ /security/) { print $i; exit } } }' "$f")"
        [[ -n "$uri" ]] && { echo "$uri"; return 0; }
    done
    echo "http://deb.debian.org/debian"
}

# Unpacks trixie's wasi-libc under $WASM_TOOLS_DIR/wasi-libc-trixie; prints the lib dir.
wasm_trixie_wasi_libc() {
    local root="$WASM_TOOLS_DIR/wasi-libc-trixie" apt="$WASM_TOOLS_DIR/apt-trixie"
    local libdir="$root/usr/lib/wasm32-wasip2"
    if [[ -f "$libdir/libc.a" ]]; then
        echo "$libdir"
        return 0
    fi
    local mirror keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    mirror="$(wasm_debian_mirror)"
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/empty" "$apt/download"
    echo "deb [signed-by=$keyring] $mirror trixie main" >"$apt/sources.list"
    # Own sources, lists and cache; no system preferences or extra sources; the system's
    # dpkg status is only read. Nothing is installed: the .deb is unpacked with dpkg -x.
    local opts=(
        -o "Dir::Etc::SourceList=$apt/sources.list"
        -o "Dir::Etc::SourceParts=$apt/empty"
        -o "Dir::Etc::Preferences=$apt/empty/none"
        -o "Dir::Etc::PreferencesParts=$apt/empty"
        -o "Dir::State::Lists=$apt/lists"
        -o "Dir::Cache=$apt/cache"
        -o "Acquire::Languages=none"
        -o "Debug::NoLocking=1"
        # The download lands in our own dir, which apt's _apt user may not be able to enter.
        -o "APT::Sandbox::User=$(id -un)"
    )
    wasm_say "route B: fetching Debian trixie's wasi-libc from $mirror (private apt config in $apt)"
    apt-get "${opts[@]}" update >&2 || return 1
    rm -f "$apt/download/"*.deb
    (cd "$apt/download" && apt-get "${opts[@]}" download wasi-libc >&2) || return 1
    rm -rf "$root"
    dpkg -x "$apt/download/"wasi-libc_*.deb "$root" || return 1
    [[ -f "$libdir/libc.a" ]] || return 1
    echo "$libdir"
}

wasm_route_b() {
    if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-query >/dev/null 2>&1; then
        wasm_die "neither route works: rustup's wasm32-wasip2 target is unavailable and this is not a Debian machine (no apt-get) for route B"
    fi
    mkdir -p "$WASM_TOOLS_DIR"
    wasm_apt_install "${WASM_ROUTE_B_PACKAGES[@]}"

    local rustc=/usr/bin/rustc cargo=/usr/bin/cargo
    [[ -x "$rustc" && -x "$cargo" ]] || wasm_die "route B: $rustc or $cargo missing after installing ${WASM_ROUTE_B_PACKAGES[*]}"

    # rustc-web's rust-lld points into the LLVM it was built with; its lld package also
    # provides the wasm-ld that wasm-component-ld drives.
    local lld_target llvm_version
    lld_target="$(readlink /usr/bin/rust-lld || true)"
    # `lld-22` on bookworm; accept `/usr/lib/llvm-22/bin/lld` as well.
    llvm_version="$(sed -n 's/.*\(lld\|llvm\)-\([0-9][0-9]*\).*/\2/p' <<<"$lld_target")"
    [[ -n "$llvm_version" ]] || wasm_die "route B: cannot tell the LLVM version from /usr/bin/rust-lld -> '$lld_target'"
    wasm_apt_install "lld-$llvm_version"
    local wasm_ld="/usr/lib/llvm-$llvm_version/bin/wasm-ld"
    [[ -x "$wasm_ld" ]] || wasm_die "route B: $wasm_ld missing after installing lld-$llvm_version"

    local host sysroot component_ld
    host="$("$rustc" -vV | sed -n 's/^host: //p')"
    sysroot="$("$rustc" --print sysroot)"
    component_ld="$sysroot/lib/rustlib/$host/bin/wasm-component-ld"
    [[ -x "$component_ld" ]] || wasm_die "route B: $component_ld missing (package rust-web-llvm)"
    [[ -d "$sysroot/lib/rustlib/src/rust/library/std" ]] ||
        wasm_die "route B: std sources missing under $sysroot/lib/rustlib/src (package rust-web-src)"

    local libdir extra=()
    if libdir="$(wasm_trixie_wasi_libc)"; then
        # trixie's libc keeps pthread emulation separate; std's thread module needs it.
        extra=(-Clink-arg=-lwasi-emulated-pthread)
    else
        wasm_say "route B: trixie's wasi-libc unavailable; falling back to bookworm's preview1 wasi-libc (std::net/std::thread will not link)"
        wasm_apt_install wasi-libc
        libdir=/usr/lib/wasm32-wasi
        [[ -f "$libdir/libc.a" ]] || wasm_die "route B: no libc.a in $libdir (package wasi-libc)"
    fi

    WASM_ROUTE=b
    WASM_CARGO=("$cargo")
    # shellcheck disable=SC2054 # `std,panic_abort` is one value, not two elements
    WASM_ENV=(
        "RUSTC=$rustc"
        "RUSTDOC=$(dirname "$rustc")/rustdoc"
        # build-std is unstable; the Debian compiler is a stable build of the same sources.
        RUSTC_BOOTSTRAP=1
        CARGO_UNSTABLE_BUILD_STD=std,panic_abort
        CARGO_BUILD_TARGET=wasm32-wasip2
        "CARGO_TARGET_WASM32_WASIP2_RUSTFLAGS=-Clink-self-contained=no -Lnative=$libdir -Clink-arg=--wasm-ld-path=$wasm_ld ${extra[*]}"
    )
    wasm_say "route B: $("$rustc" --version) + build-std, wasm-ld $wasm_ld, libc $libdir"
}

# ---------------------------------------------------------------------------- entry

wasm_toolchain_ensure() {
    local route="${1:-auto}"
    wasm_clean_env
    mkdir -p "$WASM_TOOLS_DIR"
    # Two builds started at once (make -j) must not run apt or unpack the libc together.
    exec 9>"$WASM_TOOLS_DIR/.lock"
    flock 9
    case "$route" in
        a | A)
            wasm_route_a || wasm_die "route A was requested but is unavailable (see above); try --route b"
            ;;
        b | B)
            wasm_route_b
            ;;
        auto | "")
            wasm_route_a || {
                wasm_say "falling back to route B (Debian packages)"
                wasm_route_b
            }
            ;;
        *)
            wasm_die "unknown route '$route' (expected auto, a or b)"
            ;;
    esac
    flock -u 9
}

wasm_toolchain_main() {
    local route="${PATCHBAY_WASM_ROUTE:-auto}"
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --route) route="${2:?--route needs a value: auto, a or b}"; shift 2 ;;
            --route=*) route="${1#--route=}"; shift ;;
            --quiet) WASM_QUIET=1; shift ;;
            -h | --help) sed -n '4,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; return 0 ;;
            *) wasm_die "unknown argument '$1' (see --help)" ;;
        esac
    done
    wasm_toolchain_ensure "$route"
    echo "wasm32-wasip2 toolchain ready: route $WASM_ROUTE"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    wasm_toolchain_main "$@"
fi
