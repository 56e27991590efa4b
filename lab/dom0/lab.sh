#!/bin/sh
# `lab` inside dom0 (runs from the 9p share; the host calls it through the request agent).
# Small, bounded steps the host-side scenario (xtask/src/lab) strings together:
#   lab guest-up [MEM_MB]     (re)create the PV guest "guest", wait until its service answers
#   lab client-start NAME     start counter-client in netns "client" behind a veth on xenbr0
#   lab client-stop           ask the client to finish (stop file), wait for it
#   lab client-tcp            the client's TCP state (ss -tni: retransmits, backoff, rto)
#   lab remus-start MODE      start the primary side in the background; MODE is
#                             anchor  (stock: xl remus -F -n -i 200 guest localhost, over ssh)
#                             relay   (remus relay receive + xl remus -s '' … remus relay send)
#                             capture (stock, -s '', stream teed to /share/run/stream.bin)
#   lab relay-sampler         (started by remus-start relay) every second, writes what
#                             `remus relay status -j` says of each relay end to
#                             /share/run/relay-send.json and relay-receive.json
#   lab remus-alive           exit 0 if the sending xl is still running
#   lab freeze-primary        the primary host dies silently: SIGSTOP the sending xl, its save
#                             helper and its transport (ssh or relay send), destroy the primary
#   lab stop-sender           SIGSTOP the primary side only (ends a capture cleanly)
#   lab unfreeze-kill         SIGKILL the frozen primary-side processes (closes their sockets)
#   lab cleanup               kill everything the lab started, destroy all guests
# State in /run/lab, logs in /share/run. Times are dom0's clock, Unix seconds.
# LAB_RELAY_BUFFER replaces the relay's `--vif vifN.0` (e.g. `--no-buffer`, diagnostics).
set -u
export PATH=/share/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
S=/run/lab
L=/share/run
GUEST_IP=169.254.0.2
CLIENT_IP=169.254.0.10
PORT=7000
INTERVAL=${LAB_INTERVAL:-200}
# The relay's heartbeat: looser than its 1 s default because dom0 runs under software
# emulation on a shared host, where a 1 s scheduling stall is not a dead primary.
HB=${LAB_HEARTBEAT:---heartbeat-interval 300ms --heartbeat-timeout 3s}
# Each relay end's status socket: the sampler asks exactly these.
SOCK_SEND=/run/remus/lab-send.sock
SOCK_RECEIVE=/run/remus/lab-receive.sock
mkdir -p "$S" "$L"

die() { echo "lab: $*" >&2; exit 1; }
now() { date +%s.%N; }

domid_of() { xl domid "$1" 2>/dev/null; }

probe_service() {
    echo probe | timeout 5 busybox nc -w 3 "$GUEST_IP" "$PORT" 2>/dev/null | grep -qE '^[0-9]+$'
}

guest_up() {
    mem=${1:-64}
    for d in $(xl list | awk 'NR>1 && $1!="Domain-0" {print $1}'); do xl destroy "$d" || true; done
    # init_on_free=1: the guest zeroes what it frees (its unpacked initramfs, init
    # memory), so its idle pages are zeros and a captured stream compresses well.
    cat >"$S/guest.cfg" <<CFG
name = "guest"
type = "pv"
kernel = "/share/guest/vmlinuz"
ramdisk = "/share/guest/initrd.img"
extra = "console=hvc0 loglevel=4 init_on_free=1"
memory = $mem
maxmem = $mem
vcpus = 1
vif = [ 'mac=00:16:3e:4c:41:42,bridge=xenbr0' ]
on_crash = "preserve"
CFG
    t0=$(now)
    xl create "$S/guest.cfg" || die "xl create failed"
    i=0
    until probe_service; do
        i=$((i + 1))
        [ $i -gt 90 ] && die "the guest's service did not answer on $GUEST_IP:$PORT within ~180 s"
        sleep 2
    done
    echo "guest domid=$(domid_of guest) ready_after_s=$(awk "BEGIN{printf \"%.1f\", $(now) - $t0}")"
}

client_netns() {
    ip netns list | grep -q '^client' && return 0
    ip netns add client
    ip link add vcl type veth peer name vcl-br
    ip link set vcl netns client
    ip link set vcl-br master xenbr0 up
    ip -n client addr add "$CLIENT_IP/16" dev vcl
    ip -n client link set lo up
    ip -n client link set vcl up
}

client_start() {
    name=$1
    client_netns
    rm -f "$S/client.stop" "$L/client-$name.jsonl"
    setsid ip netns exec client counter-client --connect "$GUEST_IP:$PORT" --interval-ms 100 \
        --timeout-s 600 --stop-file "$S/client.stop" --log "$L/client-$name.jsonl" \
        </dev/null >"$L/client-$name.stderr" 2>&1 &
    echo $! >"$S/client.pid"
    i=0
    until grep -q '"connected"' "$L/client-$name.jsonl" 2>/dev/null; do
        i=$((i + 1))
        if [ $i -gt 300 ] || ! kill -0 "$(cat "$S/client.pid")" 2>/dev/null; then
            die "client did not connect: $(cat "$L/client-$name.jsonl" "$L/client-$name.stderr" 2>/dev/null)"
        fi
        sleep 0.2
    done
    echo "client pid=$(cat "$S/client.pid")"
}

client_stop() {
    touch "$S/client.stop"
    p=$(cat "$S/client.pid" 2>/dev/null) || return 0
    is "$p" counter-client || return 0
    i=0
    while kill -0 "$p" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.2; i=$((i + 1)); done
    kill -9 "$p" 2>/dev/null || true
}

# Starts "$@" in its own session with its pid in $S/$name.pid, output in $L/$name.log.
bg() {
    name=$1
    shift
    setsid sh -c 'echo $$ >"$0"; exec "$@"' "$S/$name.pid" "$@" </dev/null >"$L/$name.log" 2>&1 &
    i=0
    while [ ! -s "$S/$name.pid" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
}

remus_start() {
    mode=$1
    d=$(domid_of guest) || die "no domain named guest"
    echo "$d" >"$S/primary.domid"
    rm -f "$S/sender.pid" "$S/receiver.pid"
    case $mode in
    anchor)
        bg sender xl -vvv remus -F -n -i "$INTERVAL" guest localhost
        ;;
    capture)
        rm -f "$L/stream.bin"
        bg sender xl -vvv remus -F -n -i "$INTERVAL" -s '' guest \
            "sh -c 'tee $L/stream.bin | xl migrate-receive -r -e'"
        ;;
    relay)
        if [ ! -s /root/remus.key ]; then
            head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >/root/remus.key
            echo >>/root/remus.key
        fi
        chmod 600 /root/remus.key
        rm -f "$L/relay-send.json" "$L/relay-receive.json"
        bg receiver remus relay receive --listen 127.0.0.1:7788 --key-file /root/remus.key $HB \
            --status-socket "$SOCK_RECEIVE"
        sleep 1
        kill -0 "$(cat "$S/receiver.pid")" 2>/dev/null || die "remus relay receive exited: $(tail -n 20 "$L/receiver.log")"
        bg sender xl -vvv remus -F -n -i "$INTERVAL" -s '' guest \
            "remus relay send --backup 127.0.0.1:7788 --key-file /root/remus.key ${LAB_RELAY_BUFFER:---vif vif$d.0} $HB --status-socket $SOCK_SEND"
        bg sampler sh /share/lab/dom0/lab.sh relay-sampler
        ;;
    *) die "unknown mode $mode" ;;
    esac
    sleep 1
    kill -0 "$(cat "$S/sender.pid")" 2>/dev/null || die "xl remus exited at once: $(tail -n 20 "$L/sender.log")"
    echo "primary domid=$d sender pid=$(cat "$S/sender.pid") started=$(now)"
}

# Samples each relay end's status once a second into the share (atomically, by rename). A
# frozen relay does not answer (the status command gives up after 2 s): its last sample
# stays. Runs until cleanup kills it.
relay_sampler() {
    while :; do
        for role in send receive; do
            case $role in send) sock=$SOCK_SEND ;; *) sock=$SOCK_RECEIVE ;; esac
            [ -S "$sock" ] || continue
            if remus relay status -j --socket "$sock" >"$L/relay-$role.json.tmp" 2>/dev/null; then
                mv "$L/relay-$role.json.tmp" "$L/relay-$role.json"
            fi
        done
        sleep 1
    done
}

descendants() {
    for c in $(pgrep -P "$1"); do
        echo "$c"
        descendants "$c"
    done
}

# The primary side: the sending xl and all its descendants except the receiving side (in a
# one-host lab with `-s ''` the receiving xl and its restore helper can be children of the
# sending xl too, and are also called libxl-save-helper: recognised by their argv).
primary_pids() {
    sp=$(cat "$S/sender.pid" 2>/dev/null) || die "no sender pid"
    echo "$sp"
    for p in $(descendants "$sp"); do
        a=$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null) || continue
        case $a in
        ssh\ * | */ssh\ *) echo "$p" ;; # the transport to the backup (its argv names the receiver)
        *migrate-receive* | *--restore-domain* | *"relay receive"*) ;;
        *) echo "$p" ;;
        esac
    done
}

freeze_primary() {
    d=$(cat "$S/primary.domid")
    pids=$(primary_pids)
    t=$(now)
    # Freeze the sender first so it cannot react to its children stopping.
    for p in $pids; do kill -STOP "$p"; done
    echo "$pids" >"$S/frozen.pids"
    xl destroy "$d" || die "xl destroy $d failed"
    # The guest ran (and answered) until destroyed: that is the moment of death.
    t2=$(now)
    for p in $pids; do echo "frozen pid=$p: $(tr '\0' ' ' <"/proc/$p/cmdline")"; done
    echo "frozen_at=$t death=$t2 destroyed_domid=$d"
}

# Freeze the primary side without destroying anything (capture: end the stream cleanly).
stop_sender() {
    pids=$(primary_pids)
    for p in $pids; do kill -STOP "$p"; done
    echo "$pids" >"$S/frozen.pids"
    echo "stopped=$(now)"
}

unfreeze_kill() {
    for p in $(cat "$S/frozen.pids" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
    echo "killed=$(now)"
}

# True if pid $1 is alive and its argv contains $2 (pid files can outlive their process).
is() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q -- "$2"; }

cleanup() {
    client_stop 2>/dev/null
    for f in sender receiver sampler; do
        p=$(cat "$S/$f.pid" 2>/dev/null) || continue
        is "$p" "xl\|remus\|relay-sampler" || continue
        for c in $(descendants "$p") "$p"; do kill -9 "$c" 2>/dev/null; done
    done
    for p in $(cat "$S/frozen.pids" 2>/dev/null); do is "$p" "xl\|remus\|ssh\|helper" && kill -9 "$p"; done
    pkill -9 -x counter-client 2>/dev/null
    sleep 1
    for d in $(xl list | awk 'NR>1 && $1!="Domain-0" {print $1}'); do xl destroy "$d" || true; done
    rm -f "$S"/*.pid "$S/frozen.pids"
    xl list
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in
guest-up) guest_up "$@" ;;
client-start) client_start "$@" ;;
client-stop) client_stop ;;
remus-start) remus_start "$@" ;;
status) xl list ;;
client-tcp) ip netns exec client ss -tni state established 2>/dev/null | tail -n +2 | tr -s ' \t\n' ' ' ;;
relay-sampler) relay_sampler ;;
remus-alive) kill -0 "$(cat "$S/sender.pid")" 2>/dev/null ;;
freeze-primary) freeze_primary ;;
unfreeze-kill) unfreeze_kill ;;
stop-sender) stop_sender ;;
cleanup) cleanup ;;
*) die "usage: lab guest-up|client-start|client-stop|client-tcp|remus-start|relay-sampler|remus-alive|freeze-primary|stop-sender|unfreeze-kill|cleanup" ;;
esac
