#!/usr/bin/env bash
# Unpacks Debian 12's QEMU (qemu-system-x86 7.2 and its firmware) into OUT_DIR without
# installing it: the machine's backported qemu-utils Breaks qemu-system-common << 8.0, and
# no matching 8.x+ qemu-system is in the configured sources. The plain shared libraries
# QEMU links against are installed with apt (they conflict with nothing).
#
# Usage: get-qemu.sh OUT_DIR   (OUT_DIR/bin/qemu-system-x86_64, OUT_DIR/fw/, OUT_DIR/modules/)
set -euo pipefail
out=$1
log() { printf '[get-qemu] %s\n' "$*" >&2; }
pkgs=(qemu-system-x86 qemu-system-common qemu-system-data seabios ipxe-qemu)

rm -rf "$out.tmp" && mkdir -p "$out.tmp/debs" "$out.tmp/root"
cd "$out.tmp/debs"
export DEBIAN_FRONTEND=noninteractive
apt-get download "${pkgs[@]}" 2>/dev/null || { apt-get update -qq; apt-get download "${pkgs[@]}"; }
libs=()
for f in qemu-system-x86_*.deb qemu-system-common_*.deb; do
    for d in $(dpkg-deb -f "$f" Depends | tr ',' '\n' | sed 's/^ *//; s/ .*//; s/|.*//' | grep '^lib'); do
        dpkg-query -W -f='${Status}' "$d" 2>/dev/null | grep -q 'install ok installed' || libs+=("$d")
    done
done
if [ ${#libs[@]} -gt 0 ]; then
    log "installing QEMU's libraries: ${libs[*]}"
    apt-get install -y -qq --no-install-recommends "${libs[@]}" ||
        { apt-get update -qq; apt-get install -y -qq --no-install-recommends "${libs[@]}"; }
fi
for f in *.deb; do dpkg-deb -x "$f" ../root; done
cd ..
mkdir -p bin fw modules
cp root/usr/bin/qemu-system-x86_64 bin/
# TCG itself is a loadable module in Debian's build: run QEMU with QEMU_MODULE_DIR=modules.
cp -a root/usr/lib/x86_64-linux-gnu/qemu/. modules/
# seabios first, then the rest without overwriting (bios-microvm.bin is a symlink clash).
cp -aL root/usr/share/seabios/. fw/
cp -anL root/usr/share/qemu/. fw/ 2>/dev/null || true
rm -rf root debs
bin/qemu-system-x86_64 --version | head -n1 >&2
rm -rf "$out" && mv "$out.tmp" "$out"
