//! Putting the buffer on a vif and taking it off again.
//!
//! Owns: the attach sequence (checks, load or reuse the pinned maps, the first epoch of a
//! takeover, the helper tap and its release program, the capture program, the socket and
//! the state file, then the holder task), and detach from a fresh process after the
//! holder died. Never touches: the holder's running state (`service`), the wire format
//! of the socket (`control`).
use std::{io, os::unix::fs::PermissionsExt};

use remus_common::{CTL_EPOCH, CTL_MODE, CTL_VIF_IFINDEX, MODE_HOLD, MODE_PASSTHROUGH};
use tokio::{io::unix::AsyncFd, net::UnixListener};

use super::{
    AttachOptions, NetError,
    control::{DetachReport, Mode},
    files::{RunDir, StateFile, is_root, now_unix, pid_alive},
    io_err,
    service::{self, Holder, Running},
};
use crate::{
    datapath::{self, AttachKind, Loaded},
    epochs::EpochQueues,
    netlink::Netlink,
    tap::{TAP_PREFIX, Tap},
};

/// Refuses options that cannot work, before anything is touched.
fn check_options(opts: &AttachOptions) -> Result<(), NetError> {
    if !is_root() {
        return Err(NetError::NotRoot);
    }
    if opts.ring_bytes < 4096 || !opts.ring_bytes.is_power_of_two() {
        return Err(NetError::BadRingSize(opts.ring_bytes as u64));
    }
    if opts.limit_bytes < 65536 {
        return Err(NetError::BadLimit(opts.limit_bytes));
    }
    Ok(())
}

/// Loads the object (reusing a dead holder's pinned maps) and sets the control slots.
/// Returns it with the epoch the new holder opens: a takeover continues the numbering,
/// and frames of the dead holder's epochs still in the ring are dropped (their commit
/// will never come).
fn load(opts: &AttachOptions, ifindex: u32) -> Result<(Loaded, u64), NetError> {
    let pins = datapath::pin_dir(&opts.iface);
    let mut loaded = Loaded::load(&pins, &opts.iface, opts.ring_bytes)?;
    let first_epoch = if loaded.reused {
        loaded.control(CTL_EPOCH)? + 1
    } else {
        1
    };
    loaded.set_control(CTL_EPOCH, first_epoch)?;
    let mode = if opts.passthrough {
        MODE_PASSTHROUGH
    } else {
        MODE_HOLD
    };
    loaded.set_control(CTL_MODE, mode)?;
    loaded.set_control(CTL_VIF_IFINDEX, ifindex as u64)?;
    Ok((loaded, first_epoch))
}

/// Creates the helper tap (MTU of the vif) with its release program: releases work from
/// the first frame on.
async fn helper_tap(
    nl: &Netlink,
    loaded: &mut Loaded,
    ifindex: u32,
) -> Result<(Tap, String), NetError> {
    let tap_name = format!("{TAP_PREFIX}{ifindex}");
    let tap = Tap::create(&tap_name)?;
    let tap_index = nl.ifindex(&tap_name).await?;
    if let Ok(Some(mtu)) = nl.mtu(ifindex).await {
        let _ = nl.set_mtu(tap_index, mtu).await;
    }
    nl.set_up(tap_index).await?;
    loaded.attach_release(&tap_name)?;
    Ok((tap, tap_name))
}

/// Binds the control socket (root only) and writes the state file.
fn publish(run_dir: &RunDir, state: &StateFile) -> Result<UnixListener, NetError> {
    let sock = run_dir.socket(&state.iface);
    let _ = std::fs::remove_file(&sock);
    let listener =
        UnixListener::bind(&sock).map_err(io_err(format!("binding {}", sock.display())))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(format!("chmod 0600 {}", sock.display())))?;
    let path = run_dir.state(&state.iface);
    run_dir
        .write_state(state)
        .map_err(io_err(format!("writing {}", path.display())))?;
    Ok(listener)
}

/// Attaches the buffer to `opts.iface` and starts the holder task on the current runtime.
/// Returns once holding is active (every frame from here on is held, or passed in
/// pass-through mode).
pub async fn attach(opts: AttachOptions) -> Result<Running, NetError> {
    check_options(&opts)?;
    let run_dir = RunDir::default();
    let nl = Netlink::connect()?;
    let ifindex = nl.ifindex(&opts.iface).await?;
    run_dir
        .ensure()
        .map_err(io_err(format!("creating {}", run_dir.path().display())))?;
    if let Some(st) = run_dir.read_state(&opts.iface)
        && pid_alive(st.pid)
        && st.pid != std::process::id()
    {
        return Err(NetError::AlreadyAttached {
            iface: opts.iface.clone(),
            pid: st.pid,
        });
    }
    let (mut loaded, first_epoch) = load(&opts, ifindex)?;
    let ring = loaded.take_ring()?;
    // SAFETY: the AsyncFd owns the RingBuf, which owns the fd: it stays open for as
    // long as it is registered.
    let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| NetError::Io {
            what: "registering the ring buffer with the reactor".into(),
            source: io::Error::other(e.to_string()),
        })?;
    let (tap, tap_name) = helper_tap(&nl, &mut loaded, ifindex).await?;
    let kind = loaded.attach_vif(&opts.iface, opts.attach_mode)?;
    let state = StateFile {
        iface: opts.iface.clone(),
        ifindex,
        pid: std::process::id(),
        attach_kind: kind,
        tap: tap_name,
        ring_bytes: opts.ring_bytes,
        limit_bytes: opts.limit_bytes,
        socket: run_dir.socket(&opts.iface),
        pins: loaded.pin_dir().to_path_buf(),
        started_unix: now_unix(),
    };
    let listener = publish(&run_dir, &state)?;
    let holder = Holder {
        iface: opts.iface.clone(),
        ifindex,
        loaded,
        ring,
        tap,
        queues: EpochQueues::new(first_epoch, opts.limit_bytes),
        nl,
        kind,
        mode: if opts.passthrough {
            Mode::Passthrough
        } else {
            Mode::Hold
        },
        ring_bytes: opts.ring_bytes,
        release_errors: 0,
        unreleasable: 0,
        autocommit: opts.autocommit,
        run_dir,
    };
    service::spawn(holder, listener)
}

/// Deletes the clsact qdisc of `iface` if remus-net added it (`kind` says); returns notes.
pub(super) async fn remove_clsact(
    nl: &Netlink,
    iface: &str,
    kind: Option<AttachKind>,
) -> Vec<String> {
    let Some(AttachKind::Netlink {
        created_clsact: true,
    }) = kind
    else {
        return Vec::new();
    };
    vec![match nl.delete_clsact(iface).await {
        Ok(()) => "removed the clsact qdisc remus-net added".into(),
        Err(e) => format!("could not remove the clsact qdisc: {e}"),
    }]
}

/// Detach when the holder is dead (or never answers): remove program, pins and runtime
/// files from this fresh process, and say what was lost.
pub async fn detach_offline(iface: &str) -> Result<DetachReport, NetError> {
    if !is_root() {
        return Err(NetError::NotRoot);
    }
    datapath::ensure_bpffs()?;
    let run_dir = RunDir::default();
    let state = run_dir.read_state(iface);
    let pins = datapath::pin_dir(iface);
    let pinned = datapath::read_pinned(&pins)?;
    if state.is_none() && pinned.is_none() {
        return Err(NetError::NotAttached {
            iface: iface.to_string(),
            path: format!("{} or {}", run_dir.state(iface).display(), pins.display()),
        });
    }
    let nl = Netlink::connect()?;
    let present = nl.ifindex(iface).await.is_ok();
    let kind = state.as_ref().map(|s| s.attach_kind);
    let mut report = DetachReport {
        iface: iface.to_string(),
        ..Default::default()
    };
    if let Some(p) = &pinned {
        // Captured but never reinjected: held by the dead holder or left in the ring.
        report.lost_frames = p
            .stats
            .captured_frames
            .saturating_sub(p.stats.redirected_frames);
    }
    report.notes = datapath::teardown(iface, &pins, kind, present)?;
    if present {
        report.notes.extend(remove_clsact(&nl, iface, kind).await);
    }
    run_dir.remove(iface);
    Ok(report)
}

/// What the pins of `iface` say (counters, epoch, mode), for `status` of a dead holder.
pub fn pinned_state(iface: &str) -> Result<Option<datapath::PinnedState>, NetError> {
    datapath::ensure_bpffs()?;
    Ok(datapath::read_pinned(&datapath::pin_dir(iface))?)
}

/// Whether any pin of `iface` is left.
pub fn pins_left(iface: &str) -> bool {
    datapath::pin_dir(iface).exists()
}
