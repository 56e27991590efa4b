#!/usr/bin/env bash
# Builds the lab guest's initramfs: busybox (static) + xen-netfront.ko from the dom0 rootfs
# (the same Debian kernel boots the guest) + the project's static counter-server + init.
# Usage: build-guest.sh ROOTFS_FILES_DIR COUNTER_SERVER INIT OUT_INITRD
# ROOTFS_FILES_DIR holds busybox and xen-netfront.ko (extracted by build-image.sh).
set -euo pipefail
files=$1 server=$2 init=$3 out=$4
w=$(mktemp -d)
trap 'rm -rf "$w"' EXIT
mkdir -p "$w"/{bin,lib,proc,sys,dev,tmp}
cp "$files/busybox" "$w/bin/busybox"
cp "$files/xen-netfront.ko" "$w/lib/xen-netfront.ko"
# xen-blkfront.ko, when build-image.sh found it: the guest of the scenario `disk`.
if [ -f "$files/xen-blkfront.ko" ]; then cp "$files/xen-blkfront.ko" "$w/lib/xen-blkfront.ko"; fi
cp "$server" "$w/bin/counter-server"
cp "$init" "$w/init"
chmod 755 "$w/init" "$w/bin/busybox" "$w/bin/counter-server"
(cd "$w" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 | gzip -1) >"$out.tmp"
mv "$out.tmp" "$out"
