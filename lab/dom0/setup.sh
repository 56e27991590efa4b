#!/bin/sh
# dom0 setup in the Xen lab, run by /lab/rcS from the 9p share on every boot: Xen
# backends, xenstored + xenconsoled (guest consoles logged to the share), the bridge
# xenbr0 (169.254.0.1/16, link-local, nothing leaves the emulated machine), sshd for the
# anchor run's `xl remus … localhost`. Ends by touching /share/run/dom0-ready.
set -x
export PATH=/share/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mkdir -p /run/lab /share/run/console /var/log/xen /run/xen /run/sshd
ip link set lo up
modprobe -a xen-evtchn xen-gntdev xen-gntalloc xen-blkback xen-netback xen-privcmd \
    bridge veth tun sch_plug sch_ingress cls_bpf act_bpf || true
mountpoint -q /proc/xen || mount -t xenfs xenfs /proc/xen
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
# xenconsoled logs every guest console under the share (debugging, `lab console`).
grep -v '^XENCONSOLED_ARGS' /etc/default/xen >/run/lab/default-xen 2>/dev/null || true
echo 'XENCONSOLED_ARGS="--log=guest --log-dir=/share/run/console"' >>/run/lab/default-xen
cp /run/lab/default-xen /etc/default/xen
/etc/init.d/xen start || exit 1
xl info | grep -E 'xen_version|total_memory|free_memory'
ip link add xenbr0 type bridge stp_state 0 forward_delay 0
ip addr add 169.254.0.1/16 dev xenbr0
ip link set xenbr0 up
/usr/sbin/sshd || exit 1
date +%s.%N >/share/run/dom0-ready
echo LAB-DOM0-READY
