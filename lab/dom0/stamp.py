#!/usr/bin/env python3
# `lab.sh stamp MODE OUT SECONDS [FILE]` in a dom0: a bounded watcher that stamps what it
# sees with dom0's clock, as JSON lines in OUT (the machine turns them into the lab
# report's checkpoint phases and failover timeline, xtask/src/lab/scenario/timeline.rs).
#
#   tail FILE   every new line of FILE (from its end when started), as {"t","line"}:
#               the primary's `xl -vvv remus` log, whose lines carry no time of their own
#               (xl -T stamps whole seconds only)
#   failover    the backup during a failover, each change as {"t","what","value"}:
#               the relay receiver's state (its status socket), every new line of
#               run/receiver.log (the relay's log and the receiving xl's), each vif's
#               existence, bridge port, carrier (netback: the guest's frontend connected)
#               and first frame received from the guest, and the bridge port the guest's
#               MAC is learnt on (xenbr0's forwarding table)
#
# It starts no process (a fork + exec costs a dom0 under emulation about half a second
# of CPU): sysfs, the status socket and the log files are read directly. Clock: OUT.sync0
# and OUT.sync1 (at start and at the end) hold dom0's time when written; the machine
# reads their modification time (the 9p share's file lives on the machine) and so maps
# dom0's clock to its own. Ends after SECONDS (failover: or 5 s after the bridge learnt the guest's MAC on a vif
# with the relay failed over). Touches nothing but OUT and its sync files.
import json, os, socket, sys, time

GUEST_MAC = bytes.fromhex("00163e4c4142")
SOCK = os.environ.get("SOCK_RECEIVE", "/run/remus/lab-receive.sock")
RUN = os.environ.get("L", "/share/run")


def sync(out, k):
    with open(f"{out}.sync{k}", "w") as f:
        f.write(f"{time.time():.6f}\n")


class Tail:
    """New complete lines of a file, from its end when first opened (or its start if it
    did not exist yet)."""

    def __init__(self, path):
        self.path, self.pos, self.rest = path, None, b""
        try:
            self.pos = os.path.getsize(path)
        except OSError:
            self.pos = 0

    def lines(self):
        try:
            size = os.path.getsize(self.path)
        except OSError:
            return []
        if size < self.pos:
            self.pos, self.rest = 0, b""
        if size == self.pos:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            b = f.read(size - self.pos)
        self.pos += len(b)
        b = self.rest + b
        *done, self.rest = b.split(b"\n")
        return [l.decode("utf-8", "replace") for l in done]


def relay_state():
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(1)
        s.connect(SOCK)
        b = b""
        while True:
            c = s.recv(65536)
            if not c:
                break
            b += c
        s.close()
        v = json.loads(b)
        v = v[0] if isinstance(v, list) else v
        ls = v.get("last_session") or {}
        return f"{v.get('state')} failovers={v.get('failovers_total')} end={ls.get('end')}"
    except (OSError, ValueError, IndexError, KeyError):
        return None


def read(p):
    try:
        with open(p) as f:
            return f.read().strip()
    except OSError:
        return None


def vifs():
    """Per vif: exists, on a bridge, carrier, frames received from the guest (yes/no)."""
    v = {}
    for n in os.listdir("/sys/class/net"):
        if not n.startswith("vif"):
            continue
        d = f"/sys/class/net/{n}"
        rx = read(f"{d}/statistics/rx_packets")
        v[n] = {
            "bridge_port": os.path.exists(f"{d}/brport"),
            "carrier": read(f"{d}/carrier") == "1",
            "rx_from_guest": rx is not None and rx != "0",
        }
    return v


def guest_mac_port():
    """The bridge port (interface) xenbr0 has learnt the guest's MAC on, or None."""
    try:
        with open("/sys/class/net/xenbr0/brforward", "rb") as f:
            b = f.read()
    except OSError:
        return None
    for i in range(0, len(b) - 15, 16):
        e = b[i : i + 16]
        if e[0:6] == GUEST_MAC:
            port = e[6] | (e[12] << 8)
            for n in os.listdir("/sys/class/net/xenbr0/brif"):
                if read(f"/sys/class/net/xenbr0/brif/{n}/port_no") in (hex(port), str(port)):
                    return n
            return f"port {port}"
    return None


def main():
    mode, out, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    sync(out, 0)
    end = time.time() + seconds
    f = open(out, "w", buffering=1)

    def emit(**kv):
        f.write(json.dumps({"t": round(time.time(), 6), **kv}) + "\n")

    if mode == "tail":
        t = Tail(sys.argv[4])
        while time.time() < end:
            for l in t.lines():
                emit(line=l)
            time.sleep(0.03)
    elif mode == "failover":
        log = Tail(f"{RUN}/receiver.log")
        seen = {}

        def change(what, value):
            if seen.get(what, "-") != value:
                seen[what] = value
                emit(what=what, value=value)

        done, i = None, 0
        while time.time() < end and (done is None or time.time() < done + 5):
            # The relay's status every 200 ms (each ask costs the relay a little).
            if i % 4 == 0:
                change("relay", relay_state())
            i += 1
            for l in log.lines():
                emit(what="log", value=l)
            for n, v in vifs().items():
                for k, x in v.items():
                    change(f"{n}.{k}", x)
            change("guest_mac_port", guest_mac_port())
            # The backup's guest reached the LAN: 5 s more, then the sync file is due.
            r = str(seen.get("relay"))
            failed_over = "failovers=" in r and "failovers=0" not in r
            if done is None and failed_over and str(seen.get("guest_mac_port")).startswith("vif"):
                done = time.time()
            time.sleep(0.05)
    else:
        sys.exit(f"stamp.py: unknown mode {mode}")
    f.close()
    sync(out, 1)


if __name__ == "__main__":
    main()
