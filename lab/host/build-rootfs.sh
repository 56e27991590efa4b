#!/usr/bin/env bash
# Builds the dom0 root filesystem of the Xen lab with debootstrap (Debian 12, Xen 4.17,
# Debian's 6.1 kernel), then slims it. Run by `cargo xtask lab build`, which decides
# whether this is needed (cache key) and bounds it with `timeout`.
#
# Usage: build-rootfs.sh OUT_DIR DEB_CACHE_DIR PACKAGES(comma-separated)
# The Debian mirror is the one apt on this host uses (first URIs: line of the sources).
set -euo pipefail
out=$1 debs=$2 packages=$3
# The device model for HVM guests (issue 13): Debian 12's qemu-system-xen and its
# libraries, 19 packages beyond the others, about 64 MB installed of which iso-codes'
# 20 MB of data is dropped below (nothing here reads it).
packages="$packages,qemu-system-xen"

log() { printf '[build-rootfs] %s\n' "$*" >&2; }

mirror=$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 | awk '{print $1}')
if [ -z "$mirror" ]; then
    mirror=$(awk '$1=="deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
fi
[ -n "$mirror" ] || { log "cannot find the Debian mirror in apt's sources"; exit 1; }

if grep -q " $out[/ ]" /proc/mounts 2>/dev/null || grep -q " $out/" /proc/mounts; then
    log "something is mounted under $out; refusing to delete it"; exit 1
fi
rm -rf "$out" "$out.tmp"
mkdir -p "$debs" "$out.tmp"
log "debootstrap bookworm into $out.tmp"
debootstrap --variant=minbase --cache-dir="$debs" --include="$packages" bookworm "$out.tmp" "$mirror"

r=$out.tmp
log "slimming"
rm -rf "$r"/var/cache/apt/archives/*.deb "$r"/var/lib/apt/lists/* "$r"/usr/share/doc/* \
    "$r"/usr/share/man/* "$r"/usr/share/locale/* "$r"/usr/share/info/* \
    "$r"/usr/share/iso-codes "$r"/usr/share/xml/iso-codes
for kdir in "$r"/lib/modules/*/kernel; do
    for d in drivers/gpu drivers/media drivers/net/wireless drivers/infiniband drivers/staging \
        drivers/usb drivers/bluetooth drivers/iio drivers/hid drivers/input drivers/isdn \
        drivers/scsi drivers/net/ethernet drivers/mtd drivers/hwmon drivers/platform \
        drivers/leds drivers/edac drivers/nfc drivers/thunderbolt drivers/mmc drivers/w1 \
        drivers/i2c drivers/spi drivers/power drivers/mfd drivers/ata drivers/md \
        net/wireless net/mac80211 net/bluetooth sound fs/btrfs fs/xfs fs/ocfs2 fs/nfs \
        fs/nfsd fs/cifs fs/smb fs/f2fs fs/gfs2 fs/ntfs3 fs/ubifs fs/jfs fs/reiserfs; do
        rm -rf "${kdir:?}/$d"
    done
done
for v in "$r"/lib/modules/*; do
    chroot "$r" depmod -a "$(basename "$v")"
done
rm -rf "$r"/lib/firmware/*
mv "$r" "$out"
log "done: $(du -sh "$out" | cut -f1)"
