#!/usr/bin/env python3
# `lab.sh hold PHASE DELAY_MS BACKUP_REPL_IP` on the primary (the soak, xtask/src/lab/soak.rs): waits
# until replication is in PHASE, then stops the whole sending side (xl, its save helper,
# the relay sender: SIGSTOP, all at once) so the phase holds until the machine powers the
# host off right after this returns. From the backup and the client a sending side stopped
# at that instant cannot be told from a power-off at that instant (nothing it held leaves,
# nothing more reaches the backup); only the guest runs on until the power-off, its output
# held in the buffer. Prints one JSON line: the phase asked, the phase seen, the sender's
# status when it stopped and the guest's state after; `held` is false when the phase had
# already passed when the sending side stopped (the round is then still judged, by what the
# backup says it held).
#
# Phases (the relay's `remus relay status -j` fields, read from its status socket; the
# guest's state from `xl list`):
#   initial-copy  connected, no checkpoint complete yet; stopped DELAY_MS after that is seen
#   suspended     at least one checkpoint complete, the guest seen suspended (`s`) by xl
#                 for a checkpoint; xl stopped, it stays suspended
#   ack-pending   the backup's data segments dropped on repl0 (iptables INPUT, segments
#                 over 80 bytes: pure TCP ACKs pass, so the stream still reaches the
#                 backup), so relay ACKs never arrive; stopped once a checkpoint complete
#                 at the sender is unacked for DELAY_MS (it reached the backup; the
#                 backup's own status says so later);
#                 the drop never lasts more than a few seconds (GATE_S, retried), well
#                 under the heartbeat timeout
#   release       as ack-pending until output is held, then the drop is lifted: the held
#                 ACKs arrive and release their epochs; stopped DELAY_MS (0-50) later
#   idle          every complete checkpoint acked and the guest running; stopped DELAY_MS
#                 later (within the interval between checkpoints)
# Touches: the sending side's processes (signals only), one iptables INPUT rule on repl0.
# Never the backup.
import json, os, signal, socket, subprocess, sys, time

SOCK = os.environ.get("SOCK_SEND", "/run/remus/lab-send.sock")
BOUND_S = 300
GATE_S = 4.0


def status():
    """The sender's status (one relay), or None while it does not answer."""
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2)
        s.connect(SOCK)
        b = b""
        while True:
            c = s.recv(65536)
            if not c:
                break
            b += c
        s.close()
        return json.loads(b)
    except (OSError, ValueError):
        return None


def guest_state():
    """xl's state letters of the domain named guest (e.g. `-b----`, `---s--`)."""
    out = subprocess.run(["xl", "list", "guest"], capture_output=True, text=True).stdout
    lines = out.strip().splitlines()
    return lines[-1].split()[4] if len(lines) > 1 else None


def sending_pids():
    """The sending xl and all its descendants (the relay sender among them)."""
    root = int(open("/run/lab/sender.pid").read().strip())
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


PIDS = None


def prepare():
    """Finds the sending side's processes ahead of the stop, so that the stop follows the
    last look at the phase by no more than the signals themselves."""
    global PIDS
    PIDS = sending_pids()


def stop():
    pids = PIDS or sending_pids()
    for p in pids:
        try:
            os.kill(p, signal.SIGSTOP)
        except OSError:
            pass
    with open("/run/lab/frozen.pids", "w") as f:
        f.write("\n".join(map(str, pids)) + "\n")
    return pids


def gate(drop, peer):
    """Drops (or lets through again) every TCP segment from the backup on repl0 that
    carries data (its ACK and heartbeat frames), and only those: a segment of at most
    80 bytes (20 of IPv4 header, at most 60 of TCP header) is a pure TCP acknowledgement
    and passes, so the primary's stream keeps flowing into the backup while its ACKs are
    held back. (Dropping every frame from the backup stalled the primary's TCP window:
    the checkpoint then never reached the backup, and "ack-pending" was not reached.)"""
    rule = ["INPUT", "-i", "repl0", "-s", f"{peer}/32", "-p", "tcp",
            "-m", "length", "--length", "81:65535", "-j", "DROP"]
    subprocess.run(["iptables", "-I" if drop else "-D", *rule], check=True)


def wait(cond, what):
    t = time.time()
    while time.time() - t < BOUND_S:
        s = status()
        if s is not None and cond(s):
            return s
        time.sleep(0.01)
    sys.exit(f"hold: {what} not seen within {BOUND_S} s (last status: {status()})")


def nums(s):
    return {k: s.get(k) for k in ("checkpoints_total", "last_acked", "committed_epoch",
                                  "acks_total", "stream_bytes_total", "peer")}


def main():
    phase, delay_ms, peer = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    d = delay_ms / 1000.0
    seen, extra = phase, {}
    if phase == "initial-copy":
        wait(lambda s: s.get("peer") and s["stream_bytes_total"] > 0, "a connected sender")
        prepare()
        time.sleep(d)
        s = status()
        if s is None or s["checkpoints_total"] > 0:
            seen = "after-initial-copy"
    elif phase == "suspended":
        wait(lambda s: s["checkpoints_total"] >= 1, "a first checkpoint")
        prepare()
        t = time.time()
        while time.time() - t < BOUND_S:
            st = guest_state()
            if st and "s" in st:
                break
        s = status()
    elif phase in ("ack-pending", "release"):
        # The gate must not stay shut near the heartbeat timeout (8 s in the lab): the
        # primary would then declare the backup lost and let its output go. Tries again
        # if no unacked checkpoint shows within GATE_S.
        while True:
            base = wait(lambda s: s["checkpoints_total"] >= 2 and s["last_acked"] >= 1,
                        "two checkpoints, one acked")
            prepare()
            gate(True, peer)
            t = time.time()
            s = None
            while time.time() - t < GATE_S:
                s = status()
                if s and s["checkpoints_total"] > max(s["last_acked"], base["checkpoints_total"]):
                    break
                s = None
                time.sleep(0.01)
            if s is not None:
                break
            gate(False, peer)
            time.sleep(2)
        extra["acked_at_gate"] = base["last_acked"]
        if phase == "ack-pending":
            time.sleep(d)
            s = status() or s
        else:
            time.sleep(0.3)
            gate(False, peer)
            time.sleep(d)
            s = status() or s
        extra["gate_shut_s"] = round(time.time() - t, 3)
    elif phase == "idle":
        prepare()
        wait(lambda s: s["checkpoints_total"] >= 2 and s["last_acked"] >= s["checkpoints_total"],
             "every checkpoint acked")
        time.sleep(d)
        s = status()
    else:
        sys.exit(f"hold: unknown phase {phase}")
    pids = stop()
    at = time.time()
    after = guest_state()
    if phase == "suspended" and (after is None or "s" not in after):
        seen = "not-suspended"
    if phase == "idle" and (s is None or s["last_acked"] < s["checkpoints_total"]
                            or (after and "s" in after)):
        seen = "not-idle"
    print(json.dumps({"phase": phase, "seen": seen, "held": seen == phase, "delay_ms": delay_ms, "stopped_unix": at,
                      "sender": nums(s) if s else None, "guest_state_after": after,
                      "stopped_pids": len(pids), **extra}))


main()
