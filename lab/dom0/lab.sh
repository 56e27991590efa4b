#!/bin/sh
# `lab` inside a host's dom0 (runs from the 9p share; the machine calls it through the
# request agent). Small, bounded commands the scenarios (xtask/src/lab/scenario) string
# together:
#   lab guest-up [MEM_MB [pv|pvh|hvm [VIFS]]]
#                                 (re)create the guest "guest" (PV by default, 1 vif), wait
#                                 (LAB_GUEST_WAIT_S, 240 s) until its service answers on
#                                 the client LAN (hvm: needs the device model); with 2 vifs
#                                 the second is on xenbr1 (lan2-up) and its own service
#                                 must answer there too
#   lab lan2-up                   the second client LAN's bridge xenbr1 (over the third
#                                 NIC, lan1), idempotent
#   lab relay-receive ADDR:PORT   (backup) start `remus relay receive` listening there,
#                                 and the relay sampler
#   lab backup-start              (backup) `remus backup guest`, configured by
#                                 /etc/remus/remus.toml (setup.sh): the command line of
#                                 the package's remus-backup@guest unit (dom0 runs busybox
#                                 init, no systemd), and the relay sampler
#   lab remus-start MODE [PEER]   (primary) start the sending side in the background:
#                                 anchor PEER_IP  stock xl remus -F -n -i 200 guest PEER_IP
#                                                 (over ssh)
#                                 relay PEER:PORT xl remus -s '' … remus relay send to the
#                                                 backup's relay, and the relay sampler
#                                 protect         `remus protect guest` (the package's
#                                                 remus-protect@guest unit's command
#                                                 line), configured by remus.toml
#                                 capture         stock, -s '' to this host, the stream
#                                                 teed to /share/run/stream.bin
#   lab relay-sampler             (started by the above) every 2 s, writes what
#                                 `remus relay status -j` says of each relay end on this
#                                 host to /share/run/relay-send.json, relay-receive.json
#   lab remus-alive               exit 0 if the sending xl is still running
#   lab hold PHASE MS PEER_IP     (primary, the soak) wait for a replication phase and stop
#                                 the sending side in it (hold.py says how)
#   lab stop-sender               SIGSTOP the sending side (ends a capture cleanly)
#   lab domains                   the names of the domains this host runs, one a line
#   lab disk-receive ADDR:PORT    (backup, scenario `disk`) `remus disk receive` of the
#                                 replicated disk guestdisk, listening there (/dev/nbd0
#                                 after its failover); relay-receive then adds --disk
#   lab disk-serve PEER:PORT      (primary) `remus disk serve` of guestdisk as /dev/nbd0
#                                 to that backup, until it is in sync; guest-up then gives
#                                 the guest the disk (script=block-remus) and remus-start
#                                 relay adds `xl remus -d` and the relay's --disk
#   lab disk-check                what the guest's service says of its disk (`disk?`: its
#                                 memory vs its disk), then the disk daemon's status
#   lab stamp MODE OUT SECONDS [FILE]  start stamp.py in the background (bounded): the
#                                 primary's xl log lines (tail) or the backup's failover
#                                 (failover), stamped with dom0's clock into OUT
#   lab cleanup                   kill everything the lab started, destroy all guests
# State in /run/lab, logs in /share/run. Times are dom0's clock, Unix seconds.
# LAB_RELAY_BUFFER replaces the relay's `--vif vifN.0 …` (one per vif of the guest; e.g.
# `--no-buffer`, diagnostics).
set -u
export PATH=/share/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export S=/run/lab
export L=/share/run
GUEST_IP=169.254.0.2
PORT=7000
# The service behind a two-vif guest's second vif (its eth1, on xenbr1).
GUEST2_IP=169.254.1.2
PORT2=7001
INTERVAL=${LAB_INTERVAL:-200}
# The relay's heartbeat: much looser than its 1 s default because each dom0 runs under
# software emulation, two of them (and the switch) on 2 shared cores: with 3 s, the
# backup judged a primary busy with the initial copy silent (3.0-3.1 s) in 2 of 3 tries.
HB=${LAB_HEARTBEAT:---heartbeat-interval 300ms --heartbeat-timeout 8s}
# Each relay end's status socket: the sampler asks exactly these.
export SOCK_SEND=/run/remus/lab-send.sock
export SOCK_RECEIVE=/run/remus/lab-receive.sock
KEY=/root/remus.key
# The scenario `disk`: one replicated disk, guestdisk, a sparse file on each host served
# as /dev/nbd0. $S/disk.name (written once the daemon runs) is what makes guest-up,
# relay-receive and remus-start use it; cleanup removes it.
DISK=guestdisk
DISK_DIR=/var/lib/remus-lab
DISK_SOCK=/run/remus/disk-$DISK.sock
DISK_MB=${LAB_DISK_MB:-64}
# As loose as the relay's (HB), and a little looser: a disk daemon that judges its peer
# lost ends protection fail closed (the next cut fails).
DISK_HB=${LAB_DISK_HEARTBEAT:---heartbeat-interval 500ms --heartbeat-timeout 10s}
mkdir -p "$S" "$L"

die() { echo "lab: $*" >&2; exit 1; }
now() { date +%s.%N; }

domid_of() { xl domid "$1" 2>/dev/null; }

probe_service() {
    echo probe | timeout 5 busybox nc -w 3 "${1:-$GUEST_IP}" "${2:-$PORT}" 2>/dev/null | grep -qE '^[0-9]+$'
}

guest_up() {
    mem=${1:-64}
    kind=${2:-pv}
    vifs=${3:-1}
    case $kind in pv | pvh | hvm) ;; *) die "guest-up: unknown guest type $kind" ;; esac
    case $vifs in 1 | 2) ;; *) die "guest-up: 1 or 2 vifs, not $vifs" ;; esac
    for d in $(xl list | awk 'NR>1 && $1!="Domain-0" {print $1}'); do xl destroy "$d" || true; done
    vif="'mac=00:16:3e:4c:41:42,bridge=xenbr0'"
    if [ "$vifs" = 2 ]; then
        lan2_up >/dev/null || die "no second client LAN"
        vif="$vif, 'mac=00:16:3e:4c:41:43,bridge=xenbr1'"
    fi
    # init_on_free=1: the guest zeroes what it frees (its unpacked initramfs, init
    # memory), so its idle pages are zeros and a captured stream compresses well.
    # lab_vifs=N tells the guest's init how many NICs to bring up.
    # HVM: the device model (qemu-system-xen) boots the same kernel directly; the
    # kernel's console goes to hvc0 once its Xen drivers run (ttyS0 before).
    console=hvc0 hvm=
    [ "$kind" = hvm ] && console="ttyS0 console=hvc0" && hvm='serial = "pty"
vnc = 0
sdl = 0'
    cat >"$S/guest.cfg" <<CFG
name = "guest"
type = "$kind"
kernel = "/share/guest/vmlinuz"
ramdisk = "/share/guest/initrd.img"
extra = "console=$console loglevel=4 init_on_free=1 lab_vifs=$vifs"
memory = $mem
maxmem = $mem
vcpus = 1
vif = [ $vif ]
on_crash = "preserve"
$hvm
CFG
    # The scenario `disk`: the replicated disk, by name (block-remus asks the local disk
    # daemon for its device; the same config works on the backup after its failover).
    if [ -s "$S/disk.name" ]; then
        echo "disk = [ 'vdev=xvda, access=w, script=block-remus, target=$(cat "$S/disk.name")' ]" >>"$S/guest.cfg"
    fi
    # How long the service may take (LAB_GUEST_WAIT_S): an HVM guest boots through
    # SeaBIOS and the device model under emulation, minutes.
    wait_s=${LAB_GUEST_WAIT_S:-240}
    t0=$(now)
    xl create "$S/guest.cfg" || die "xl create failed"
    d=$(domid_of guest)
    echo "created_after_s=$(awk "BEGIN{printf \"%.1f\", $(now) - $t0}") domid=$d"
    emu_seen=
    until probe_service; do
        # An HVM guest's emulated NIC: say when its tap appears and when it goes (the
        # PV drivers unplug it).
        if [ -e "/sys/class/net/vif$d.0-emu" ]; then
            [ -z "$emu_seen" ] && emu_seen=1 && echo "emu_tap_after_s=$(awk "BEGIN{printf \"%.1f\", $(now) - $t0}")"
        elif [ "$emu_seen" = 1 ]; then
            emu_seen=2 && echo "emu_tap_gone_after_s=$(awk "BEGIN{printf \"%.1f\", $(now) - $t0}")"
        fi
        awk "BEGIN{exit !($(now) - $t0 > $wait_s)}" &&
            die "the guest's service did not answer on $GUEST_IP:$PORT within $wait_s s"
        sleep 2
    done
    if [ "$vifs" = 2 ]; then
        i=0
        until probe_service "$GUEST2_IP" "$PORT2"; do
            i=$((i + 1))
            [ $i -gt 30 ] && die "the guest's second service did not answer on $GUEST2_IP:$PORT2 (its second vif, xenbr1) within ~60 s"
            sleep 2
        done
    fi
    echo "guest domid=$(domid_of guest) type=$kind vifs=$vifs ready_after_s=$(awk "BEGIN{printf \"%.1f\", $(now) - $t0}")"
}

# The second client LAN: the host's third NIC (MAC 52:54:00:4c:01:*, on the switch's third
# hub) named `lan1`, in bridge xenbr1, with dom0's address there 169.254.1.X/24 (X: the last
# byte of its xenbr0 address, 1 on A, 3 on B), so that guest-up can probe the service
# behind the guest's second vif. Idempotent.
lan2_up() {
    if ! ip link show xenbr1 >/dev/null 2>&1; then
        if ! ip link show lan1 >/dev/null 2>&1; then
            nic=
            for d in /sys/class/net/*; do
                case $(cat "$d/address" 2>/dev/null) in 52:54:00:4c:01:*) nic=${d##*/} ;; esac
            done
            [ -n "$nic" ] || { echo "no NIC on the second client LAN (52:54:00:4c:01:*)" >&2; return 1; }
            ip link set "$nic" name lan1 || return 1
        fi
        ip link add xenbr1 type bridge stp_state 0 forward_delay 0 || return 1
        a=$(ip -4 -o addr show dev xenbr0 | awk '{print $4; exit}')
        a=${a%/*}
        ip addr add "169.254.1.${a##*.}/24" dev xenbr1 || return 1
        ip link set lan1 master xenbr1 && ip link set lan1 up && ip link set xenbr1 up || return 1
    fi
    echo "xenbr1 $(ip -4 -o addr show dev xenbr1 | awk '{print $4; exit}') on $(ls /sys/class/net/xenbr1/brif | tr '\n' ' ')"
}

# `--vif` for every vif of domain $1 (vifD.N, and vifD.N-emu of an HVM guest's device model).
vif_args() {
    for v in /sys/class/net/vif"$1".*; do
        [ -e "$v" ] && printf -- '--vif %s ' "${v##*/}"
    done
}

# Starts "$@" in its own session with its pid in $S/$name.pid, output in $L/$name.log.
bg() {
    name=$1
    shift
    setsid sh -c 'echo $$ >"$0"; exec "$@"' "$S/$name.pid" "$@" </dev/null >"$L/$name.log" 2>&1 &
    i=0
    while [ ! -s "$S/$name.pid" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
}

# The relay key: the machine put the same one in both hosts' shares (a regular file,
# mode 0600, as the relay requires).
install_key() {
    [ -s /share/lab/remus.key ] || die "no relay key in /share/lab/remus.key"
    cp /share/lab/remus.key "$KEY"
    chmod 600 "$KEY"
}

start_sampler() {
    p=$(cat "$S/sampler.pid" 2>/dev/null) && is "$p" relay-sampler && return 0
    bg sampler sh /share/lab/dom0/lab.sh relay-sampler
}

relay_receive() {
    listen=$1
    install_key
    rm -f "$S/receiver.pid" "$L/relay-receive.json"
    bg receiver remus relay receive --listen "$listen" --key-file "$KEY" $HB \
        --status-socket "$SOCK_RECEIVE" $(disk_flag)
    sleep 1
    kill -0 "$(cat "$S/receiver.pid")" 2>/dev/null || die "remus relay receive exited: $(tail -n 20 "$L/receiver.log")"
    start_sampler
    echo "relay receive pid=$(cat "$S/receiver.pid") listening on $listen"
}

# The backup as the package runs it: `remus backup guest` checks, then becomes `remus
# relay receive` (same pid) with its status socket at /run/remus/relay-receive-guest.sock;
# the sampler's fixed $SOCK_RECEIVE is pointed at it.
backup_start() {
    rm -f "$S/receiver.pid" "$L/relay-receive.json"
    mkdir -p /run/remus
    ln -sfn /run/remus/relay-receive-guest.sock "$SOCK_RECEIVE"
    bg receiver /usr/sbin/remus backup guest
    sleep 1
    kill -0 "$(cat "$S/receiver.pid")" 2>/dev/null || die "remus backup guest exited: $(tail -n 20 "$L/receiver.log")"
    start_sampler
    echo "remus backup guest pid=$(cat "$S/receiver.pid") ($(grep '^listen' /etc/remus/remus.toml))"
}

remus_start() {
    mode=$1
    peer=${2:-}
    d=$(domid_of guest) || die "no domain named guest"
    echo "$d" >"$S/primary.domid"
    rm -f "$S/sender.pid"
    case $mode in
    anchor)
        [ -n "$peer" ] || die "remus-start anchor needs the backup's address"
        bg sender xl -vvv remus -F -n -i "$INTERVAL" guest "$peer"
        ;;
    capture)
        rm -f "$L/stream.bin"
        bg sender xl -vvv remus -F -n -i "$INTERVAL" -s '' guest \
            "sh -c 'tee $L/stream.bin | xl migrate-receive -r -e'"
        ;;
    relay)
        [ -n "$peer" ] || die "remus-start relay needs the backup relay's ADDR:PORT"
        install_key
        rm -f "$L/relay-send.json"
        vifs=$(vif_args "$d")
        [ -n "$vifs" ] || die "domain $d has no vif"
        bg sender xl -vvv remus -F -n $(disk_xl_flag) -i "$INTERVAL" -s '' guest \
            "remus relay send --backup $peer --key-file $KEY ${LAB_RELAY_BUFFER:-$vifs} $HB --status-socket $SOCK_SEND $(disk_flag)"
        start_sampler
        ;;
    protect)
        # Backup, key, interval and heartbeat from /etc/remus/remus.toml. Its relay's
        # status socket is named after the (first) vif: the sampler's $SOCK_SEND points there.
        rm -f "$L/relay-send.json"
        mkdir -p /run/remus
        ln -sfn "/run/remus/relay-send-vif$d.0.sock" "$SOCK_SEND"
        bg sender /usr/sbin/remus protect guest
        start_sampler
        ;;
    *) die "unknown mode $mode" ;;
    esac
    sleep 1
    kill -0 "$(cat "$S/sender.pid")" 2>/dev/null || die "xl remus exited at once: $(tail -n 20 "$L/sender.log")"
    echo "primary domid=$d sender pid=$(cat "$S/sender.pid") started=$(now)"
}

# Samples each relay end's status every LAB_SAMPLE_S seconds (default 2) into the share
# (atomically, by rename). A relay that does not answer (the status command gives up after
# 2 s) keeps its last sample; one whose socket is gone (it exited) has its sample removed. Runs until cleanup kills it. In bash, napping with `read -t`
# on a FIFO: a `sleep` process per round would cost dom0 more than the sample itself.
relay_sampler() {
    exec /bin/bash -c '
        mkfifo /run/lab/sampler.nap 2>/dev/null
        exec 9<>/run/lab/sampler.nap
        while :; do
            for role in send receive; do
                sock=$SOCK_SEND
                [ $role = receive ] && sock=$SOCK_RECEIVE
                # A relay that is gone leaves no sample behind (a stale one would say
                # it still replicates).
                [ -S "$sock" ] || { rm -f "$L/relay-$role.json"; continue; }
                if remus relay status -j --socket "$sock" >"$L/relay-$role.json.tmp" 2>/dev/null; then
                    mv "$L/relay-$role.json.tmp" "$L/relay-$role.json"
                fi
            done
            read -r -t "${LAB_SAMPLE_S:-2}" -u 9 _
        done' relay-sampler
}

descendants() {
    for c in $(pgrep -P "$1"); do
        echo "$c"
        descendants "$c"
    done
}

# The sending side: the sending xl and all its descendants except the receiving side (a
# capture sends to this host: the receiving xl and its restore helper are children of the
# sending xl too, and are also called libxl-save-helper: recognised by their argv).
primary_pids() {
    sp=$(cat "$S/sender.pid" 2>/dev/null) || die "no sender pid"
    echo "$sp"
    for p in $(descendants "$sp"); do
        a=$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null) || continue
        case $a in
        *migrate-receive* | *--restore-domain*) ;;
        *) echo "$p" ;;
        esac
    done
}

# Freeze the sending side without destroying anything (capture: end the stream cleanly).
stop_sender() {
    pids=$(primary_pids)
    for p in $pids; do kill -STOP "$p"; done
    echo "$pids" >"$S/frozen.pids"
    echo "stopped=$(now)"
}

# True if pid $1 is alive and its argv contains $2 (pid files can outlive their process).
is() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q -- "$2"; }

# The relay's --disk for the replicated disk, if this host runs its daemon.
disk_flag() { [ -s "$S/disk.name" ] && echo "--disk $DISK_SOCK"; }
# xl remus must not replicate the disk itself (libxl's remus knows only DRBD): -d.
disk_xl_flag() { [ -s "$S/disk.name" ] && echo "-d"; }

# Both hosts: nbd, the hotplug script, the key, a fresh sparse backing file.
disk_prepare() {
    modprobe nbd 2>&1 || die "modprobe nbd failed"
    i=0
    while [ ! -b /dev/nbd0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    [ -b /dev/nbd0 ] || die "no /dev/nbd0 after modprobe nbd"
    install -m 755 /share/lab/dom0/block-remus /etc/xen/scripts/block-remus
    install_key
    rm -rf "$DISK_DIR" "$S/disk.name"
    mkdir -p "$DISK_DIR"
    truncate -s "${DISK_MB}M" "$DISK_DIR/$DISK.img"
}

# Waits (up to $2 s) for the disk daemon $1 (a bg name) to answer on its control socket.
disk_wait_up() {
    i=0
    until [ -S "$DISK_SOCK" ] && remus disk status --name "$DISK" >/dev/null 2>&1; do
        kill -0 "$(cat "$S/$1.pid" 2>/dev/null)" 2>/dev/null ||
            die "remus disk exited: $(tail -n 20 "$L/$1.log")"
        i=$((i + 1))
        [ $i -gt $(($2 * 5)) ] && die "remus disk did not answer within $2 s: $(tail -n 20 "$L/$1.log")"
        sleep 0.2
    done
}

disk_receive() {
    listen=$1
    disk_prepare
    rm -f "$S/disk-receive.pid"
    bg disk-receive remus disk receive --listen "$listen" --backing "$DISK_DIR/$DISK.img" \
        --journal "$DISK_DIR/journal" --key-file "$KEY" --name "$DISK" --device /dev/nbd0 $DISK_HB
    disk_wait_up disk-receive 30
    echo "$DISK" >"$S/disk.name"
    echo "disk receive pid=$(cat "$S/disk-receive.pid") name=$DISK listening on $listen size_mb=$DISK_MB"
}

disk_serve() {
    peer=$1
    disk_prepare
    rm -f "$S/disk-serve.pid"
    t0=$(now)
    bg disk-serve remus disk serve --backing "$DISK_DIR/$DISK.img" --device /dev/nbd0 \
        --name "$DISK" --backup "$peer" --key-file "$KEY" $DISK_HB
    disk_wait_up disk-serve 30
    remus disk wait-sync --name "$DISK" --timeout 300s ||
        die "the disk did not get in sync: $(tail -n 20 "$L/disk-serve.log")"
    echo "$DISK" >"$S/disk.name"
    echo "disk serve pid=$(cat "$S/disk-serve.pid") name=$DISK device=/dev/nbd0 in_sync_after_s=$(awk "BEGIN{printf \"%.1f\", $(now) - $t0}")"
}

# The guest's own word on its disk (one line, `disk mem=… contiguous=… newer=… checks=…
# mismatches=…`), asked from this dom0 over the client LAN; then this host's daemon.
disk_check() {
    r=$(echo 'disk?' | timeout 30 busybox nc -w 20 "$GUEST_IP" "$PORT" 2>&1)
    echo "guest: $r"
    echo "daemon: $(remus disk status -j --name "$DISK" 2>&1 | tr -d '\n')"
    case $r in "disk mem="*) ;; *) exit 1 ;; esac
}

# The disk daemons, and the /dev/nbd0 a killed one leaves configured (cleanup).
disk_cleanup() {
    for f in disk-serve disk-receive; do
        p=$(cat "$S/$f.pid" 2>/dev/null) || continue
        is "$p" "remus" && kill -9 "$p" 2>/dev/null
    done
    if [ -e /sys/block/nbd0/pid ]; then
        sleep 0.5
        remus disk release --device /dev/nbd0 || echo "lab: releasing /dev/nbd0 failed" >&2
    fi
    rm -rf "$DISK_DIR" "$S/disk.name" "$DISK_SOCK"
}

cleanup() {
    for f in sender receiver sampler stamp-tail stamp-failover; do
        p=$(cat "$S/$f.pid" 2>/dev/null) || continue
        is "$p" "xl\|remus\|relay-sampler\|stamp.py" || continue
        for c in $(descendants "$p") "$p"; do kill -9 "$c" 2>/dev/null; done
    done
    for p in $(cat "$S/frozen.pids" 2>/dev/null); do is "$p" "xl\|remus\|ssh\|helper" && kill -9 "$p"; done
    # Stock Remus's receiving side on a backup is started by sshd for the peer, not by
    # this script: found by its argv (one pgrep: a shell loop over /proc costs a minute
    # under emulation), killed by pid.
    for p in $(pgrep -f 'xl migrate-receive'); do kill -9 "$p" 2>/dev/null; done
    sleep 1
    for d in $(xl list | awk 'NR>1 && $1!="Domain-0" {print $1}'); do xl destroy "$d" || true; done
    disk_cleanup
    rm -f "$S"/*.pid "$S/frozen.pids"
    # The sampler's sockets, when they point at remus protect's or remus backup's.
    for k in "$SOCK_SEND" "$SOCK_RECEIVE"; do [ -L "$k" ] && rm -f "$k"; done
    iptables -F INPUT 2>/dev/null  # the soak's ACK gate (hold.py), if a round left it
    xl list
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in
guest-up) guest_up "$@" ;;
lan2-up) lan2_up ;;
relay-receive) relay_receive "$@" ;;
backup-start) backup_start ;;
remus-start) remus_start "$@" ;;
relay-sampler) relay_sampler ;;
remus-alive) kill -0 "$(cat "$S/sender.pid")" 2>/dev/null ;;
hold) exec python3 /share/lab/dom0/hold.py "$@" ;;
stop-sender) stop_sender ;;
stamp)
    rm -f "$S/stamp-$1.pid"
    bg "stamp-$1" python3 /share/lab/dom0/stamp.py "$@"
    echo "stamp $1 pid=$(cat "$S/stamp-$1.pid" 2>/dev/null)"
    ;;
domains) xl list | awk 'NR>1 && $1!="Domain-0" {print $1}' ;;
disk-receive) disk_receive "$@" ;;
disk-serve) disk_serve "$@" ;;
disk-check) disk_check ;;
cleanup) cleanup ;;
*) die "usage: lab guest-up|lan2-up|relay-receive|backup-start|remus-start|relay-sampler|remus-alive|hold|stop-sender|stamp|domains|cleanup|disk-receive|disk-serve|disk-check" ;;
esac
