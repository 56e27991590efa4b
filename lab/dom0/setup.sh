#!/bin/sh
# dom0 setup in the Xen lab, run by /lab/rcS from the 9p share on every boot. Which host
# this is (a or b), its addresses and its NICs' MACs come from /share/lab/host.env
# (written by the machine, xtask/src/lab/share.rs). Sets up: the Xen backends, xenstored
# + xenconsoled (guest consoles logged to the share); the client LAN: NIC `lan0` in bridge
# `xenbr0` with the host's link-local address (the guest's vif joins it); the replication
# link: NIC `repl0` with its own /24; sshd (stock `xl remus` sends over ssh); remus, as
# an operator installs it: the project's Debian package (/share/pkg/remus.deb, built by
# `cargo xtask package` on every `lab up`) with `dpkg -i`, the lab's key as
# /etc/remus/key (0600, the same on both hosts: the package keeps a key it finds) and
# /etc/remus/remus.toml naming the peer as the backup and this host's replication
# address as the listener. Nothing leaves the emulated machines. Ends by touching
# /share/run/dom0-ready.
set -x
export PATH=/share/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
. /share/lab/host.env || exit 1
hostname "dom0-$LAB_HOST"
mkdir -p /run/lab /share/run/console /var/log/xen /run/xen /run/sshd
ip link set lo up
modprobe -a xen-evtchn xen-gntdev xen-gntalloc xen-blkback xen-netback xen-privcmd \
    bridge veth tun sch_plug sch_ingress cls_bpf act_bpf virtio_net || true
mountpoint -q /proc/xen || mount -t xenfs xenfs /proc/xen
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
# xenconsoled logs every guest console under the share (debugging, `lab console`).
grep -v '^XENCONSOLED_ARGS' /etc/default/xen >/run/lab/default-xen 2>/dev/null || true
echo 'XENCONSOLED_ARGS="--log=guest --log-dir=/share/run/console"' >>/run/lab/default-xen
cp /run/lab/default-xen /etc/default/xen
/etc/init.d/xen start || exit 1
xl info | grep -E 'xen_version|total_memory|free_memory'

# The NICs are told apart by MAC (PCI order names them ens3/ens4, which says nothing).
nic_by_mac() {
    for d in /sys/class/net/*; do
        [ "$(cat "$d/address" 2>/dev/null)" = "$1" ] && { echo "${d##*/}"; return 0; }
    done
    return 1
}
i=0
until nic_by_mac "$LAB_LAN_MAC" && nic_by_mac "$LAB_REPL_MAC"; do
    i=$((i + 1))
    [ $i -gt 100 ] && { echo "the lab NICs ($LAB_LAN_MAC, $LAB_REPL_MAC) did not appear"; exit 1; }
    sleep 0.1
done
ip link set "$(nic_by_mac "$LAB_LAN_MAC")" name lan0
ip link set "$(nic_by_mac "$LAB_REPL_MAC")" name repl0

ip link add xenbr0 type bridge stp_state 0 forward_delay 0
ip addr add "$LAB_BRIDGE_IP/16" dev xenbr0
ip link set lan0 master xenbr0
ip link set lan0 up
ip link set xenbr0 up
ip addr add "$LAB_REPL_IP/24" dev repl0
ip link set repl0 up

# Both hosts boot the same image, with the same root key: ssh to the peer needs no setup
# but its host key (the image's, also the same): not worth asking about.
printf 'Host 169.254.200.*\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n' \
    >>/root/.ssh/config
/usr/sbin/sshd || exit 1

# remus from its package. The key goes first: the postinst creates a random one only if
# none exists. The config after: the package's own is a conffile, replaced here whole.
if [ -f /share/pkg/remus.deb ]; then
    install -d -m 0700 /etc/remus
    install -m 0600 /share/lab/remus.key /etc/remus/key || exit 1
    t=$(date +%s.%N)
    if ! dpkg -i /share/pkg/remus.deb >/share/run/dpkg.log 2>&1; then
        cat /share/run/dpkg.log
        echo "LAB-DOM0-SETUP-FAILED: dpkg -i /share/pkg/remus.deb (see run/dpkg.log)"
        exit 1
    fi
    echo "remus installed in $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $t}") s: $(dpkg-query -W remus)"
    # The lab's settings (lab.sh's HB for the hand-composed relay): a 300 ms heartbeat
    # and 8 s timeout (two emulated hosts on 2 shared cores: 3 s did not tell a dead
    # primary from a starved one), checkpoints every 200 ms.
    cat >/etc/remus/remus.toml <<TOML
# Written by the lab (lab/dom0/setup.sh) on host $LAB_HOST.
[defaults]
backup = "$LAB_PEER_REPL_IP:7788"
listen = "$LAB_REPL_IP:7788"
key_file = "/etc/remus/key"
interval_ms = 200
heartbeat_interval_ms = 300
heartbeat_timeout_ms = 8000
TOML
    remus config check || exit 1
else
    echo "no /share/pkg/remus.deb: remus is not installed in this dom0"
fi
date +%s.%N >/share/run/dom0-ready
echo LAB-DOM0-READY
