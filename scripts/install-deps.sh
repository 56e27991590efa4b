#!/usr/bin/env bash
# Installs everything the build and the test tiers need on a fresh Debian 12 machine of
# this project's kind: Debian packages, the nightly rust-src component, and bpf-linker
# built against the nightly's own libLLVM into a project-owned prefix. Idempotent: every
# step checks first and does nothing when already done. Never touches the lab images
# (see `cargo xtask lab build`).
#
# Environment:
#   REMUS_CACHE   where project-owned tools live (default /var/cache/remus)
#   REMUS_SKIP_APT=1  skip the apt step (for machines managed otherwise)
set -euo pipefail

CACHE=${REMUS_CACHE:-/var/cache/remus}
BPF_LINKER_VERSION=0.13.0

log() { printf '[install-deps] %s\n' "$*" >&2; }

need_root() {
    if [ "$(id -u)" != 0 ]; then
        log "must run as root (installs Debian packages and writes $CACHE)"
        exit 3
    fi
}

apt_packages=(
    iproute2 ethtool iperf3 iputils-ping tcpdump bridge-utils procps psmisc
    debootstrap busybox-static cpio e2fsprogs zstd python3
    dpkg-dev binutils
    # disk tests: qemu-io is the independent NBD client
    qemu-utils
)

install_apt() {
    [ "${REMUS_SKIP_APT:-0}" = 1 ] && return 0
    local missing=()
    for p in "${apt_packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        log "Debian packages: all present"
        return 0
    fi
    log "Debian packages: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # iperf3's postinst has been seen to fail once and pass on the second try.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" ||
        apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

install_rust_src() {
    if ! rustup toolchain list | grep -q '^nightly'; then
        log "installing the nightly toolchain (minimal profile)"
        rustup toolchain install nightly --profile minimal
    fi
    if rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
        log "nightly rust-src: present"
    else
        log "nightly rust-src: installing"
        if ! rustup component add rust-src --toolchain nightly; then
            log "ERROR: could not install rust-src for nightly; the eBPF object cannot be built (-Zbuild-std=core needs it)"
            exit 3
        fi
    fi
}

install_bpf_linker() {
    local sysroot llvm_so llvm_major prefix
    sysroot=$(rustc +nightly --print sysroot)
    llvm_so=$(ls "$sysroot"/lib/libLLVM.so.*-rust-* 2>/dev/null | head -n1 || true)
    if [ -z "$llvm_so" ]; then
        log "ERROR: the nightly toolchain at $sysroot carries no libLLVM.so; bpf-linker cannot be built against it"
        exit 3
    fi
    llvm_major=$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
    prefix="$CACHE/tools/bpf-linker-$BPF_LINKER_VERSION-$(basename "$llvm_so")"
    mkdir -p "$prefix/lib"
    ln -sf "$llvm_so" "$prefix/lib/libLLVM.so"
    ln -sf "$llvm_so" "$prefix/lib/$(basename "$llvm_so")"
    if [ -x "$prefix/bin/bpf-linker" ] && "$prefix/bin/bpf-linker" --version >/dev/null 2>&1; then
        log "bpf-linker: present at $prefix/bin"
    else
        log "bpf-linker $BPF_LINKER_VERSION: building against $(basename "$llvm_so") (about 80 s)"
        LLVM_PREFIX="$prefix" cargo +stable install bpf-linker --locked --version "$BPF_LINKER_VERSION" \
            --no-default-features --features "llvm-$llvm_major" --root "$prefix" --force
    fi
    mkdir -p "$CACHE/bin"
    ln -sf "$prefix/bin/bpf-linker" "$CACHE/bin/bpf-linker"
    "$CACHE/bin/bpf-linker" --version >&2
}

need_root
mkdir -p "$CACHE"
install_apt
install_rust_src
install_bpf_linker
log "done; put $CACHE/bin on PATH (xtask does this itself)"
