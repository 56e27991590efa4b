//! Network-namespace tier (root): a TCP bulk transfer from the guest to the peer through
//! the output buffer, with a background loop of checkpoint + commit, with the guest's
//! offloads on (GSO super-frames) and off (MTU frames, checksums in software). The
//! receiver checks every byte.
use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};

use remus_tests::netns::{Topo, enter_netns, run_in};

const TOTAL: usize = 24 << 20;

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 11)) as u8
}

fn bulk(tag: &str, offloads: bool, ipv6: bool) {
    let t = Topo::new(tag);
    if ipv6 {
        t.enable_ipv6();
    }
    let (listen, connect) = if ipv6 {
        ("[fd77::2]:7400", "[fd77::2]:7400")
    } else {
        ("10.77.0.2:7400", "10.77.0.2:7400")
    };
    if !offloads {
        run_in(
            &t.guest,
            "ethtool",
            &[
                "-K", "eth0", "tso", "off", "gso", "off", "tx", "off", "sg", "off",
            ],
        )
        .ok("ethtool -K eth0 offloads off");
    }
    t.attach(&[]);

    // Receiver in the peer namespace: counts and checks every byte.
    let (ready_tx, ready_rx) = mpsc::channel();
    let peer = t.peer.clone();
    let receiver = std::thread::spawn(move || -> Result<usize, String> {
        enter_netns(&peer).map_err(|e| e.to_string())?;
        let l = TcpListener::bind(listen).map_err(|e| e.to_string())?;
        let _ = ready_tx.send(());
        let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 1 << 16];
        let mut off = 0usize;
        loop {
            let n = s
                .read(&mut buf)
                .map_err(|e| format!("read at byte {off}: {e}"))?;
            if n == 0 {
                return Ok(off);
            }
            for (k, b) in buf[..n].iter().enumerate() {
                if *b != pattern(off + k) {
                    return Err(format!(
                        "byte {} is {b:#x}, expected {:#x}",
                        off + k,
                        pattern(off + k)
                    ));
                }
            }
            off += n;
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("receiver listening");

    // Background commit loop through the CLI, like a controller.
    let stop = Arc::new(AtomicBool::new(false));
    let (stop2, t_vif) = (stop.clone(), t.vif.clone());
    let bin = remus_tests::netns::remus_net_bin()
        .to_string_lossy()
        .into_owned();
    let host = t.host.clone();
    let committer = std::thread::spawn(move || -> (u64, u64) {
        let (mut commits, mut with_frames) = (0u64, 0u64);
        while !stop2.load(Ordering::Relaxed) {
            let o = run_in(&host, &bin, &["checkpoint", &t_vif]).ok("checkpoint");
            let e = o.stdout.trim().to_string();
            let o = run_in(&host, &bin, &["commit", &t_vif, &e, "-j"]).ok("commit");
            commits += 1;
            if o.json()["released"]["frames"].as_u64().unwrap_or(0) > 0 {
                with_frames += 1;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        (commits, with_frames)
    });

    let guest = t.guest.clone();
    let sender = std::thread::spawn(move || -> Result<(), String> {
        enter_netns(&guest).map_err(|e| e.to_string())?;
        let mut s = TcpStream::connect_timeout(
            &connect.parse().map_err(|_| "addr")?,
            Duration::from_secs(30),
        )
        .map_err(|e| format!("connect: {e}"))?;
        s.set_write_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let chunk: Vec<u8> = Vec::with_capacity(1 << 20);
        let mut chunk = chunk;
        let mut off = 0;
        while off < TOTAL {
            let n = (1usize << 20).min(TOTAL - off);
            chunk.clear();
            chunk.extend((off..off + n).map(pattern));
            s.write_all(&chunk)
                .map_err(|e| format!("write at byte {off}: {e}"))?;
            off += n;
        }
        s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
        Ok(())
    });
    let sent = sender.join().expect("sender thread");
    let got = receiver.join().expect("receiver thread");
    stop.store(true, Ordering::Relaxed);
    let (commits, with_frames) = committer.join().expect("commit loop");
    eprintln!("{TOTAL} bytes through {commits} commits, {with_frames} of them released frames");
    sent.expect("sender");
    assert_eq!(
        got.expect("receiver saw intact data"),
        TOTAL,
        "bytes received"
    );
    assert!(
        with_frames >= 3,
        "the transfer needed several commits ({with_frames} of {commits} released frames)"
    );

    let st = t.status();
    assert_eq!(st["release_errors"], 0, "{st}");
    assert_eq!(st["unreleasable_frames"], 0, "{st}");
    assert_eq!(st["kernel"]["dropped_ring_full_frames"], 0, "{st}");
    assert_eq!(st["holder"]["dropped_limit_frames"], 0, "{st}");
    let (frames, bytes) = (
        st["kernel"]["captured_frames"].as_u64().unwrap_or(0),
        st["kernel"]["captured_bytes"].as_u64().unwrap_or(0),
    );
    assert!(
        bytes >= TOTAL as u64,
        "captured {bytes} bytes for {TOTAL} of payload"
    );
    if offloads {
        assert!(
            bytes / frames.max(1) > 1514,
            "no GSO super-frames captured with offloads on ({frames} frames, {bytes} bytes)"
        );
    } else {
        assert!(
            bytes / frames.max(1) <= 1514,
            "frames larger than the MTU with offloads off"
        );
    }
}

#[test]
fn root_tcp_bulk_survives_many_commits_with_offloads_on() {
    bulk("to", true, false);
}

#[test]
fn root_tcp_bulk_survives_many_commits_with_offloads_off() {
    bulk("tf", false, false);
}

/// The same over IPv6 (GSO type TCPV6 rebuilt on release).
#[test]
fn root_tcp_bulk_over_ipv6_survives_many_commits_with_offloads_on() {
    bulk("t6", true, true);
}
