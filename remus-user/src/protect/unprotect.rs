//! `remus unprotect DOMAIN`: ending a protection, from either host.
//!
//! - on the **primary**, while `remus protect DOMAIN` runs: it stops it (SIGTERM, as
//!   `systemctl stop remus-protect@DOMAIN` does), which asks the relay to end protection:
//!   the backup kills its receiver before its stream can end and destroys its copy (no
//!   failover), confirms, and only then does the relay release what it held; xl resumes
//!   the guest here, unprotected. This waits for `remus protect` to end and reports how
//!   it did: unconfirmed (the backup did not answer) leaves the output held, exit 5.
//! - on the **backup** host: it discards the backup's copy itself: it freezes, then kills
//!   the receiver (`xl migrate-receive` and its restore helper) before it can see the end
//!   of its stream, and destroys `DOMAIN--incoming`. The primary's relay then loses its
//!   backup, releases what it held (safe: no other copy exists any more) and the guest
//!   runs on, unprotected; `remus protect` there ends with exit 4.
//! - where protection already ended, it removes what is left (state files, a buffer
//!   left in pass-through mode, which holds nothing) and says how it had ended.
//!
//! A host that is both (a one-host test setup, the lab) takes the primary's way: it ends
//! both sides in order.
//!
//! Owns: those decisions and their actions. Never touches: a buffer that still holds
//! output (only an operator can judge it), the relay's code paths, a running guest.
use std::path::Path;
use std::time::{Duration, Instant};

use crate::exit::ExitCode;

use super::checks::{Host, LeftBuffer};
use super::host;
use super::state::{self, BackupState, Phase, ProtectState};
use super::xen::{self, Xen};

#[derive(Debug, thiserror::Error)]
pub enum UnprotectError {
    #[error("must run as root: it reads /run/remus and signals xl's processes")]
    NotRoot,
    #[error("`{domain}`: {detail}")]
    Unconfirmed { domain: String, detail: String },
    #[error("`{domain}`: protection ended otherwise ({phase}): {detail}")]
    EndedOtherwise {
        domain: String,
        phase: &'static str,
        detail: String,
        code: ExitCode,
    },
    #[error("could not stop `remus protect {domain}` (pid {pid}): {why}")]
    Stop {
        domain: String,
        pid: u32,
        why: String,
    },
    #[error(
        "`{domain}` is replicated by an xl remus (pid {pid}) that remus protect does not supervise: end it where it was started"
    )]
    Unsupervised { domain: String, pid: u32 },
    #[error(
        "`{domain}` is not protected on this host (no remus protect, no remus backup, no {domain}--incoming)"
    )]
    NotProtected { domain: String },
    #[error(
        "several receivers run here and none is known to belong to `{domain}` (pids {pids}); stop the right `remus backup` unit, or kill that receiver by hand"
    )]
    Ambiguous { domain: String, pids: String },
    #[error("could not stop the receiver (pid {pid}): {why}")]
    Kill { pid: u32, why: String },
    #[error("could not destroy {name}: {why}")]
    Destroy { name: String, why: String },
    #[error("xl: {0}")]
    Xen(#[from] xen::XenError),
}

impl UnprotectError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            UnprotectError::NotRoot | UnprotectError::Xen(xen::XenError::Missing { .. }) => {
                ExitCode::Unsupported
            }
            UnprotectError::Unconfirmed { .. } => ExitCode::Unconfirmed,
            UnprotectError::EndedOtherwise { code, .. } => *code,
            UnprotectError::Unsupervised { .. }
            | UnprotectError::NotProtected { .. }
            | UnprotectError::Ambiguous { .. } => ExitCode::Usage,
            UnprotectError::Kill { .. }
            | UnprotectError::Destroy { .. }
            | UnprotectError::Stop { .. }
            | UnprotectError::Xen(_) => ExitCode::Failure,
        }
    }
}

/// The ppid of every process, from /proc.
fn parents() -> Vec<(u32, u32)> {
    let mut v = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return v;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid …": comm may hold spaces and parentheses.
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r)
            && let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok())
        {
            v.push((pid, ppid));
        }
    }
    v
}

/// Every descendant of `root` (not `root` itself), parents before children.
pub fn descendants(root: u32, table: &[(u32, u32)]) -> Vec<u32> {
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(c, pp) in table {
            if pp == p && !out.contains(&c) {
                out.push(c);
                frontier.push(c);
            }
        }
    }
    out
}

/// The receiver processes under a relay: the `sh -c` it started and everything below.
fn receiver_tree(relay_pid: u32, table: &[(u32, u32)]) -> Vec<u32> {
    descendants(relay_pid, table)
}

fn kill(pid: u32, sig: i32) -> Result<(), String> {
    // SAFETY: kill(2) with a pid read from /proc; a pid that vanished gives ESRCH.
    if unsafe { libc::kill(pid as i32, sig) } == 0 {
        Ok(())
    } else {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            Ok(())
        } else {
            Err(e.to_string())
        }
    }
}

/// Freezes every process first (none may react to another's death: a receiver that saw
/// its stream end would activate the copy), then kills them all.
fn freeze_and_kill(pids: &[u32]) -> Result<(), UnprotectError> {
    for &p in pids {
        kill(p, libc::SIGSTOP).map_err(|why| UnprotectError::Kill { pid: p, why })?;
    }
    for &p in pids {
        kill(p, libc::SIGKILL).map_err(|why| UnprotectError::Kill { pid: p, why })?;
    }
    let t = Instant::now();
    while pids.iter().any(|p| host::pid_alive(*p) && !is_zombie(*p))
        && t.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(|x| x == "Z"))
        })
        .unwrap_or(true)
}

/// What unprotect did.
#[derive(Debug)]
pub struct Done {
    /// Backup: the receiver processes frozen and killed.
    pub killed: Vec<u32>,
    /// Backup: the domid of the `DOMAIN--incoming` copy destroyed.
    pub destroyed: Option<u32>,
    /// Where protection had ended already: its recorded end, and what the vif carries.
    pub ended: Option<(state::Phase, LeftBuffer)>,
    /// For the operator.
    pub message: String,
}

/// How long `remus protect` may take to end protection once stopped: its wait for the
/// relay's answer, then for xl and the relay to exit, and a margin.
pub const PRIMARY_WAIT: Duration = Duration::from_secs(120);

/// The primary's way: stop `remus protect` (it asks its relay to end protection), wait
/// for it to end, and report how it did from its state file.
fn end_on_primary(
    domain: &str,
    dir: &Path,
    s: &ProtectState,
    h: &impl Host,
    wait: Duration,
) -> Result<Done, UnprotectError> {
    let stop_err = |why: String| UnprotectError::Stop {
        domain: domain.into(),
        pid: s.pid,
        why,
    };
    kill(s.pid, libc::SIGTERM).map_err(stop_err)?;
    let t = Instant::now();
    while host::protect_pid_matches(s.pid) {
        if t.elapsed() > wait {
            return Err(stop_err(format!(
                "still running after {} s (see its log: journalctl -u remus-protect@{domain})",
                wait.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let Some(end) = state::read_json::<ProtectState>(&state::protect_path(dir, domain)) else {
        return Err(stop_err("it ended without recording how".into()));
    };
    let detail = end.detail.clone().unwrap_or_default();
    match end.phase {
        Phase::Unprotected => Ok(Done {
            killed: Vec::new(),
            destroyed: None,
            ended: Some((end.phase, worst_left(&end, h))),
            message: detail,
        }),
        Phase::EndUnconfirmed => Err(UnprotectError::Unconfirmed {
            domain: domain.into(),
            detail,
        }),
        p => Err(UnprotectError::EndedOtherwise {
            domain: domain.into(),
            phase: p.words(),
            detail,
            code: if p == Phase::BackupLost {
                ExitCode::PeerLost
            } else {
                ExitCode::Failure
            },
        }),
    }
}

/// The receiver processes to kill on this backup host: those of `remus backup DOMAIN`'s
/// relay, or (a relay started by hand, with a copy to discard) of the one relay that has
/// a receiver; several such relays are ambiguous.
fn receivers(
    domain: &str,
    backup: Option<&BackupState>,
    copy: bool,
    table: &[(u32, u32)],
) -> Result<Vec<u32>, UnprotectError> {
    let relay_pid = backup.map(|b| b.pid).filter(|p| host::pid_alive(*p));
    Ok(match relay_pid {
        Some(p) => receiver_tree(p, table),
        None if copy => {
            let relays: Vec<u32> = table
                .iter()
                .map(|(p, _)| *p)
                .filter(|p| {
                    host::cmdline(*p)
                        .is_some_and(|a| a.windows(2).any(|w| w[0] == "relay" && w[1] == "receive"))
                })
                .filter(|p| !receiver_tree(*p, table).is_empty())
                .collect();
            match relays.as_slice() {
                [] => Vec::new(),
                [one] => receiver_tree(*one, table),
                many => {
                    return Err(UnprotectError::Ambiguous {
                        domain: domain.into(),
                        pids: many
                            .iter()
                            .map(u32::to_string)
                            .collect::<Vec<_>>()
                            .join(", "),
                    });
                }
            }
        }
        None => Vec::new(),
    })
}

/// What the held vifs still carry, the worst first: a buffer that holds, a live holder,
/// one passing traffic, none.
fn worst_left(s: &ProtectState, h: &impl Host) -> LeftBuffer {
    let rank = |l: &LeftBuffer| match l {
        LeftBuffer::Holding => 3,
        LeftBuffer::Live { .. } => 2,
        LeftBuffer::Passthrough => 1,
        LeftBuffer::None => 0,
    };
    s.all_vifs()
        .iter()
        .map(|v| h.buffer_on(v))
        .max_by_key(rank)
        .unwrap_or(LeftBuffer::None)
}

/// Where protection ended already: says how, and what each vif still carries; removes
/// the state files.
fn clean_up_ended(domain: &str, dir: &Path, s: ProtectState, h: &impl Host) -> Done {
    let mut notes = vec![format!(
        "`{domain}` was not protected any more ({}{})",
        s.phase.words(),
        s.detail
            .as_ref()
            .map(|d| format!(": {d}"))
            .unwrap_or_default()
    )];
    for vif in s.all_vifs() {
        match h.buffer_on(&vif) {
            LeftBuffer::Passthrough => notes.push(format!(
                "{vif} still carries a pass-through buffer (holds nothing): remove it with `remus-net detach {vif}`"
            )),
            LeftBuffer::Holding => notes.push(format!(
                "{vif} still HOLDS the guest's output (fail closed); if the backup activated its copy, destroy this one (xl destroy {domain}); otherwise `remus-net detach {vif}` drops what is held"
            )),
            LeftBuffer::Live { pid } => notes.push(format!(
                "{vif} has a live buffer holder (pid {pid}) that remus protect did not start"
            )),
            LeftBuffer::None => {}
        }
    }
    let left = worst_left(&s, h);
    let _ = std::fs::remove_file(state::protect_path(dir, domain));
    let _ = std::fs::remove_file(state::relay_exit_path(dir, domain));
    notes.push("removed its state file".into());
    Done {
        killed: Vec::new(),
        destroyed: None,
        ended: Some((s.phase, left)),
        message: notes.join("; "),
    }
}

/// On a backup: stops the receiver of `domain` (so it cannot activate the copy) and
/// destroys the copy; what was done, if there was anything to do.
fn discard_copy(
    domain: &str,
    dir: &Path,
    xen: &impl Xen,
    list: &[xen::ListedDomain],
) -> Result<Option<Done>, UnprotectError> {
    let incoming = format!("{domain}--incoming");
    let copy = list.iter().find(|d| d.name == incoming);
    let backup: Option<BackupState> = state::read_json(&state::backup_path(dir, domain));
    let table = parents();
    let mut killed = Vec::new();
    let tree = receivers(domain, backup.as_ref(), copy.is_some(), &table)?;
    if !tree.is_empty() {
        freeze_and_kill(&tree)?;
        killed = tree;
    }
    let mut destroyed = None;
    if let Some(c) = copy {
        xen.destroy(&incoming)
            .map_err(|e| UnprotectError::Destroy {
                name: incoming.clone(),
                why: e.to_string(),
            })?;
        destroyed = Some(c.domid);
    }
    let pids = killed
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let what = match (killed.is_empty(), destroyed) {
        (false, Some(id)) => Some(format!(
            "stopped its receiver (pids {pids}) before it could activate the copy and destroyed {incoming} (domid {id})"
        )),
        (false, None) => Some(format!(
            "stopped its receiver (pids {pids}) before it could activate the copy"
        )),
        (true, Some(id)) => Some(format!(
            "destroyed the leftover copy {incoming} (domid {id})"
        )),
        (true, None) => None,
    };
    Ok(what.map(|what| Done {
            killed,
            destroyed,
            ended: None,
            message: format!(
                "discarded the backup copy of `{domain}`: {what}. The primary's relay now loses its backup: it releases what it holds and `{domain}` runs there UNPROTECTED (its `remus protect` ends with exit 4). `remus backup {domain}` keeps listening for the next `remus protect {domain}`."
            ),
    }))
}

pub fn unprotect(
    domain: &str,
    dir: &Path,
    xen: &impl Xen,
    h: &impl Host,
) -> Result<Done, UnprotectError> {
    unprotect_within(domain, dir, xen, h, PRIMARY_WAIT)
}

/// [`unprotect`], waiting at most `wait` for a primary's `remus protect` to end.
pub fn unprotect_within(
    domain: &str,
    dir: &Path,
    xen: &impl Xen,
    h: &impl Host,
    wait: Duration,
) -> Result<Done, UnprotectError> {
    if !h.is_root() {
        return Err(UnprotectError::NotRoot);
    }
    let protect: Option<ProtectState> = state::read_json(&state::protect_path(dir, domain));
    // Primary, running: end protection cleanly, both sides (see the module docs).
    if let Some(s) = &protect
        && host::protect_pid_matches(s.pid)
    {
        return end_on_primary(domain, dir, s, h, wait);
    }
    let list = xen::parse_list(&xen.list()?).map_err(|what| xen::XenError::Parse {
        cmd: "xl list".into(),
        what,
    })?;
    // Backup: discard the copy being received.
    if let Some(done) = discard_copy(domain, dir, xen, &list)? {
        return Ok(done);
    }

    if let Some(d) = list.iter().find(|d| d.name == domain)
        && let Some(pid) = h.xl_remus_running(domain, d.domid)
    {
        return Err(UnprotectError::Unsupervised {
            domain: domain.into(),
            pid,
        });
    }

    // Ended already: clean up what is left.
    if let Some(s) = protect {
        return Ok(clean_up_ended(domain, dir, s, h));
    }
    Err(UnprotectError::NotProtected {
        domain: domain.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descendants_follow_the_tree() {
        let t = [(10, 1), (11, 10), (12, 11), (13, 1), (14, 12)];
        let mut d = descendants(10, &t);
        d.sort();
        assert_eq!(d, [11, 12, 14]);
        assert!(descendants(13, &t).is_empty());
    }

    #[test]
    fn this_process_is_in_the_parent_table() {
        let me = std::process::id();
        assert!(parents().iter().any(|(p, _)| *p == me));
        assert!(!is_zombie(me));
    }
}
