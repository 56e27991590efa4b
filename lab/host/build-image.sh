#!/usr/bin/env bash
# Turns the debootstrapped rootfs into the lab's boot files: installs dom0's init (busybox
# init + lab/dom0/image/*), root's ssh key for `ssh localhost`, xl.conf; then writes
#   OUT/xen          Xen 4.17 (gunzipped: a multiboot ELF QEMU's -kernel accepts)
#   OUT/vmlinuz      Debian's kernel (dom0 and the guest)
#   OUT/initrd.img   Debian's initramfs for dom0 (virtio-blk + ext4)
#   OUT/dom0.img     the root filesystem (ext4, made with mkfs.ext4 -d: no loop mount)
#   OUT/guest-files/ busybox, xen-netfront.ko and xen-blkfront.ko for the guest's initramfs
# Usage: build-image.sh ROOTFS LAB_DIR OUT
set -euo pipefail
rootfs=$1 lab=$2 out=$3
log() { printf '[build-image] %s\n' "$*" >&2; }
rm -rf "$out.tmp" && mkdir -p "$out.tmp/guest-files"

mkdir -p "$rootfs/lab/bin"
ln -sf /bin/busybox "$rootfs/lab/bin/init"
install -m 755 "$lab/dom0/image/rcS" "$rootfs/lab/rcS"
install -m 644 "$lab/dom0/image/inittab" "$rootfs/etc/inittab"
echo dom0 >"$rootfs/etc/hostname"
printf '127.0.0.1 localhost\n::1 localhost\n127.0.1.1 dom0\n' >"$rootfs/etc/hosts"
# dom0 has fixed memory (dom0_mem): never balloon it down for guests.
grep -q '^autoballoon' "$rootfs/etc/xen/xl.conf" 2>/dev/null ||
    echo 'autoballoon="off"' >>"$rootfs/etc/xen/xl.conf"
mkdir -p "$rootfs/root/.ssh" && chmod 700 "$rootfs/root/.ssh"
if [ ! -f "$rootfs/root/.ssh/id_ed25519" ]; then
    ssh-keygen -q -t ed25519 -N '' -C lab-dom0 -f "$rootfs/root/.ssh/id_ed25519"
fi
cp "$rootfs/root/.ssh/id_ed25519.pub" "$rootfs/root/.ssh/authorized_keys"
printf 'Host localhost 127.0.0.1\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n' \
    >"$rootfs/root/.ssh/config"

zcat "$rootfs"/boot/xen-4.17-amd64.gz >"$out.tmp/xen"
cp "$rootfs"/boot/vmlinuz-* "$out.tmp/vmlinuz"
cp "$rootfs"/boot/initrd.img-* "$out.tmp/initrd.img"
cp "$rootfs/bin/busybox" "$out.tmp/guest-files/busybox"
find "$rootfs/lib/modules" -name xen-netfront.ko -exec cp {} "$out.tmp/guest-files/" \;
[ -f "$out.tmp/guest-files/xen-netfront.ko" ] || { log "xen-netfront.ko not found in the rootfs"; exit 1; }
find "$rootfs/lib/modules" -name xen-blkfront.ko -exec cp {} "$out.tmp/guest-files/" \;

size_mb=$(( $(du -sm "$rootfs" | cut -f1) + 400 ))
log "mkfs.ext4 -d ($size_mb MiB sparse)"
truncate -s "${size_mb}M" "$out.tmp/dom0.img"
mkfs.ext4 -q -F -L dom0 -d "$rootfs" "$out.tmp/dom0.img"
rm -rf "$out" && mv "$out.tmp" "$out"
log "done"
