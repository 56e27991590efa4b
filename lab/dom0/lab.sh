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
#   lab remus-start MODE [PEER]   (primary) start the sending side in the background:
#                                 anchor PEER_IP  stock xl remus -F -n -i 200 guest PEER_IP
#                                                 (over ssh)
#                                 relay PEER:PORT xl remus -s '' … remus relay send to the
#                                                 backup's relay, and the relay sampler
#                                 capture         stock, -s '' to this host, the stream
#                                                 teed to /share/run/stream.bin
#   lab relay-sampler             (started by the two above) every 2 s, writes what
#                                 `remus relay status -j` says of each relay end on this
#                                 host to /share/run/relay-send.json, relay-receive.json
#   lab remus-alive               exit 0 if the sending xl is still running
#   lab hold PHASE MS PEER_IP     (primary, the soak) wait for a replication phase and stop
#                                 the sending side in it (hold.py says how)
#   lab stop-sender               SIGSTOP the sending side (ends a capture cleanly)
#   lab domains                   the names of the domains this host runs, one a line
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
        --status-socket "$SOCK_RECEIVE"
    sleep 1
    kill -0 "$(cat "$S/receiver.pid")" 2>/dev/null || die "remus relay receive exited: $(tail -n 20 "$L/receiver.log")"
    start_sampler
    echo "relay receive pid=$(cat "$S/receiver.pid") listening on $listen"
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
        bg sender xl -vvv remus -F -n -i "$INTERVAL" -s '' guest \
            "remus relay send --backup $peer --key-file $KEY ${LAB_RELAY_BUFFER:-$vifs} $HB --status-socket $SOCK_SEND"
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

cleanup() {
    for f in sender receiver sampler; do
        p=$(cat "$S/$f.pid" 2>/dev/null) || continue
        is "$p" "xl\|remus\|relay-sampler" || continue
        for c in $(descendants "$p") "$p"; do kill -9 "$c" 2>/dev/null; done
    done
    for p in $(cat "$S/frozen.pids" 2>/dev/null); do is "$p" "xl\|remus\|ssh\|helper" && kill -9 "$p"; done
    # Stock Remus's receiving side on a backup is started by sshd for the peer, not by
    # this script: found by its argv (one pgrep: a shell loop over /proc costs a minute
    # under emulation), killed by pid.
    for p in $(pgrep -f 'xl migrate-receive'); do kill -9 "$p" 2>/dev/null; done
    sleep 1
    for d in $(xl list | awk 'NR>1 && $1!="Domain-0" {print $1}'); do xl destroy "$d" || true; done
    rm -f "$S"/*.pid "$S/frozen.pids"
    tc qdisc del dev repl0 ingress 2>/dev/null
    xl list
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in
guest-up) guest_up "$@" ;;
lan2-up) lan2_up ;;
relay-receive) relay_receive "$@" ;;
remus-start) remus_start "$@" ;;
relay-sampler) relay_sampler ;;
remus-alive) kill -0 "$(cat "$S/sender.pid")" 2>/dev/null ;;
hold) exec python3 /share/lab/dom0/hold.py "$@" ;;
stop-sender) stop_sender ;;
domains) xl list | awk 'NR>1 && $1!="Domain-0" {print $1}' ;;
cleanup) cleanup ;;
*) die "usage: lab guest-up|lan2-up|relay-receive|remus-start|relay-sampler|remus-alive|hold|stop-sender|domains|cleanup" ;;
esac
