#!/bin/sh
# dom0's request agent in the Xen lab (respawned by init). The host drops a script as
# /share/req/ID.sh and then /share/req/ID.cmd (atomically, by rename); the agent runs the
# .cmd in its own session from /root with stdin closed and writes ID.out, ID.err and
# finally ID.rc (exit status, written last by rename). No console typing anywhere.
export PATH=/share/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
R=/share/req
mkdir -p "$R"
while [ ! -e /share/run/dom0-ready ]; do sleep 0.5; done
echo "LAB-AGENT-UP" >/dev/console
while :; do
    for f in "$R"/*.cmd; do
        [ -e "$f" ] || continue
        id=${f##*/}
        id=${id%.cmd}
        mv "$f" "$R/$id.taken" 2>/dev/null || continue
        (
            cd /root
            setsid sh "$R/$id.taken" </dev/null >"$R/$id.out" 2>"$R/$id.err"
            echo $? >"$R/$id.rc.tmp"
            mv "$R/$id.rc.tmp" "$R/$id.rc"
        ) &
    done
    sleep 0.1
done
