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
    files::{RunDir, StateFile, is_root, now_unix, pid_ns},
    io_err,
    service::{self, Holder, Running},
};
use crate::{
    datapath::{self, AttachKind, Loaded, PinPlace, Pins},
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
fn load(opts: &AttachOptions, pins: &Pins, ifindex: u32) -> Result<(Loaded, u64), NetError> {
    let mut loaded = Loaded::load(&pins.dir(&opts.iface), &opts.iface, opts.ring_bytes)?;
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
        && st.holder_alive()
        && (st.pid != std::process::id() || st.pid_ns != pid_ns())
    {
        return Err(NetError::AlreadyAttached {
            iface: opts.iface.clone(),
            pid: st.pid,
        });
    }
    // Where the pins outlive this process decides how the capture program may attach.
    let pins = Pins::resolve()?;
    let attach_mode = pins.attach_mode(opts.attach_mode, &opts.iface)?;
    let (mut loaded, first_epoch) = load(&opts, &pins, ifindex)?;
    let ring = loaded.take_ring()?;
    // SAFETY: the AsyncFd owns the RingBuf, which owns the fd: it stays open for as
    // long as it is registered.
    let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| NetError::Io {
            what: "registering the ring buffer with the reactor".into(),
            source: io::Error::other(e.to_string()),
        })?;
    let (tap, tap_name) = helper_tap(&nl, &mut loaded, ifindex).await?;
    let kind = loaded.attach_vif(&opts.iface, attach_mode)?;
    if pins.place == PinPlace::Private {
        tracing::warn!(
            iface = %opts.iface,
            pins = %pins.root.display(),
            "pins are private to this mount namespace: the capture program is a netlink \
             filter, which stays attached without them"
        );
    }
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
        pin_place: Some(pins.place),
        pid_ns: pid_ns(),
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
        pins,
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
    let place = Pins::resolve()?;
    let run_dir = RunDir::default();
    let state = run_dir.read_state(iface);
    let pins = place.dir(iface);
    let pinned = datapath::read_pinned(&pins)?;
    check_reachable(iface, &place, state.as_ref(), pinned.is_some())?;
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

/// A tcx link is removed through its pin: from a private mount namespace the host's
/// pins cannot be seen, and detaching there would only pretend to.
fn check_reachable(
    iface: &str,
    here: &Pins,
    state: Option<&StateFile>,
    pinned: bool,
) -> Result<(), NetError> {
    let tcx = state.is_some_and(|s| s.attach_kind == AttachKind::Tcx);
    let held_by_host_pins = state.is_some_and(|s| s.pin_place != Some(PinPlace::Private));
    if tcx && held_by_host_pins && !pinned && here.place == PinPlace::Private {
        return Err(NetError::PinsUnreachable {
            iface: iface.to_string(),
            dir: state
                .map(|s| s.pins.display().to_string())
                .unwrap_or_default(),
        });
    }
    Ok(())
}

/// What the pins of `iface` say (counters, epoch, mode), for `status` of a dead holder,
/// and where this process looked for them.
pub fn pinned_state(iface: &str) -> Result<(Option<datapath::PinnedState>, Pins), NetError> {
    let pins = Pins::resolve()?;
    Ok((datapath::read_pinned(&pins.dir(iface))?, pins))
}

/// Whether any pin of `iface` is left.
pub fn pins_left(iface: &str) -> bool {
    Pins::resolve().is_ok_and(|p| p.dir(iface).exists())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::exit::{ExitCode, HasExitCode};

    fn state(kind: AttachKind, place: Option<PinPlace>) -> StateFile {
        StateFile {
            iface: "vif1.0".into(),
            ifindex: 3,
            pid: 1,
            attach_kind: kind,
            tap: "rms3".into(),
            ring_bytes: 4096,
            limit_bytes: 65536,
            socket: PathBuf::from("/run/remus/net-vif1.0.sock"),
            pins: PathBuf::from("/sys/fs/bpf/remus/vif1:0"),
            pin_place: place,
            pid_ns: None,
            started_unix: 0,
        }
    }

    fn here(place: PinPlace) -> Pins {
        Pins {
            root: PathBuf::from("/sys/fs/bpf/remus"),
            place,
        }
    }

    #[test]
    fn a_tcx_link_in_the_hosts_bpffs_is_not_detached_from_where_it_cannot_be_seen() {
        let tcx_host = state(AttachKind::Tcx, Some(PinPlace::Host));
        match check_reachable("vif1.0", &here(PinPlace::Private), Some(&tcx_host), false) {
            Err(e @ NetError::PinsUnreachable { .. }) => {
                assert_eq!(e.exit_code(), ExitCode::Unsupported)
            }
            other => panic!("expected PinsUnreachable, got {other:?}"),
        }
        // Seen from the host, or with the pins in sight, it goes ahead.
        assert!(check_reachable("vif1.0", &here(PinPlace::Host), Some(&tcx_host), false).is_ok());
        assert!(check_reachable("vif1.0", &here(PinPlace::Private), Some(&tcx_host), true).is_ok());
    }

    #[test]
    fn a_netlink_filter_or_private_pins_are_detached_from_anywhere() {
        let created = AttachKind::Netlink {
            created_clsact: true,
        };
        let nl = state(created, Some(PinPlace::Host));
        let private_tcx = state(AttachKind::Tcx, Some(PinPlace::Private));
        for st in [&nl, &private_tcx] {
            assert!(check_reachable("vif1.0", &here(PinPlace::Private), Some(st), false).is_ok());
        }
        assert!(check_reachable("vif1.0", &here(PinPlace::Private), None, false).is_ok());
    }
}
