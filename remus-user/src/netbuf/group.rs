//! The output buffer of a guest with several vifs: one buffer per vif behind one
//! [`NetBuffer`], one epoch sequence for all of them.
//!
//! Owns: the mapping of the group's epochs onto each vif's own numbering, the order in
//! which the vifs are cut, committed and opened, and what a failure on one vif does to
//! the others. Never touches: any vif directly (each member is a `NetBuffer`: the
//! in-process holder, a `remus-net` holder over its socket, or a fake in tests), the
//! checkpoint rules (the machine sees one buffer and is unchanged).
//!
//! ```text
//!   close_epoch  ─► vif A: close e_A   vif B: close e_B   …   (all while the guest is suspended)
//!                   returns the group's epoch (vif A's number at the first cut, one more at
//!                   each later cut); e_B - e_A never changes
//!   commit(N)    ─► for e in committed+1 ..= N:  vif A: commit e,  vif B: commit e,  …
//!   fail_open    ─► commit every closed epoch as above, then vif A: open, vif B: open, …
//! ```
//!
//! Why epoch by epoch: a frame of epoch e+1 on vif A must not leave before a frame of
//! epoch e on vif B that was captured earlier (DESIGN.md: epoch order is kept on
//! release). Each vif's commit releases in capture order through its own tap, and the
//! group waits for vif A's answer (its frames are written out) before it asks vif B.
//!
//! Numbering: each buffer numbers its own epochs (a fresh holder starts at 1; one that
//! took over from a dead holder continues the dead one's numbers), so the group learns
//! each vif's offset at the first cut and checks it at every later cut; a vif whose
//! numbers drift stops the group (`NetBufferError::Diverged`).
//!
//! Failure: if closing or committing fails on any vif (but a vanished emulated NIC,
//! below), the group stops: that call and
//! every later close or commit return an error and release nothing more, on any vif
//! (fail closed: the vifs' epochs may be out of step now, and releasing on some would
//! open one vif while another holds by accident). The driver aborts on the error; the
//! capture programs stay attached and keep holding until `remus-net detach`. Opening
//! (`fail_open`: the backup is lost, the guest runs unprotected) is the one operation
//! still tried on every vif after a failure, since opening is then what is wanted: the
//! vifs that cannot be opened are named in the error (`NetBufferError::NotOpened`).
//!
//! A vif that vanishes: an HVM guest's emulated NIC (the device model's tap,
//! `vifX.Y-emu`) is unplugged when the guest's PV drivers take over, and its tap leaves
//! dom0. A member named `…-emu` whose operation fails while its interface no longer
//! exists (in this network namespace) is not a failure of the group: it leaves the
//! group, the frames its buffer held are dropped with the device (they can never be
//! delivered through it; a dropped frame is a lost packet, which TCP recovers, never an
//! early release), and the other vifs go on in the same epochs. Any other failure of it,
//! or a PV vif (`vifX.Y`) failing or vanishing, still stops the group (a PV vif leaves
//! only with its domain).
//!
//! One vif: every call goes straight to its buffer, so `--vif X` behaves exactly as a
//! single buffer does (a lone `-emu` vif is not tolerated to vanish).
use tracing::{error, warn};

use super::{NetBuffer, NetBufferError, Released};

/// One vif of the group.
struct Member<B> {
    iface: String,
    buffer: B,
    /// This vif's epoch number when the group's epoch is the group's first one.
    base: Option<u64>,
    /// A device model's emulated NIC (`…-emu`): it may vanish while protected.
    may_vanish: bool,
}

/// Whether `iface` exists in this process's network namespace.
pub fn iface_present(iface: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(iface) else {
        return false;
    };
    // SAFETY: if_nametoindex reads a NUL-terminated name and touches nothing else.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

/// Whether a vif of this name may vanish while protected (an HVM guest's emulated NIC).
pub fn may_vanish(iface: &str) -> bool {
    iface.ends_with("-emu")
}

/// Tells whether an interface still exists.
type Probe = Box<dyn Fn(&str) -> bool + Send + Sync>;

/// Several vifs' buffers behind one `NetBuffer` (see the module docs).
pub struct VifGroup<B> {
    members: Vec<Member<B>>,
    /// Built with one vif: every call goes straight through.
    single: bool,
    /// Whether an interface still exists (`iface_present`; a fake in unit tests).
    present: Probe,
    /// The vifs that vanished and left the group, in order.
    vanished: Vec<String>,
    /// The group's first closed epoch (the first vif's number).
    first: Option<u64>,
    /// The group's last closed epoch.
    closed: u64,
    /// The group's last committed epoch.
    committed: u64,
    /// Set by the first failure: nothing is cut or released any more.
    stopped: Option<String>,
}

impl<B: NetBuffer> VifGroup<B> {
    /// `vifs`: (interface name, its buffer), in the order they are cut and released.
    /// An empty list is refused by the caller (the CLI needs at least one vif).
    pub fn new(vifs: Vec<(String, B)>) -> Self {
        Self::with_probe(vifs, Box::new(iface_present))
    }

    /// As `new`, with `present` telling whether an interface still exists.
    fn with_probe(vifs: Vec<(String, B)>, present: Probe) -> Self {
        VifGroup {
            single: vifs.len() == 1,
            present,
            vanished: Vec::new(),
            members: vifs
                .into_iter()
                .map(|(iface, buffer)| Member {
                    may_vanish: may_vanish(&iface),
                    iface,
                    buffer,
                    base: None,
                })
                .collect(),
            first: None,
            closed: 0,
            committed: 0,
            stopped: None,
        }
    }

    pub fn ifaces(&self) -> Vec<&str> {
        self.members.iter().map(|m| m.iface.as_str()).collect()
    }

    /// The vifs that vanished while protected and left the group.
    pub fn vanished(&self) -> &[String] {
        &self.vanished
    }

    /// The vif whose failure stopped the group, if one did.
    pub fn stopped_by(&self) -> Option<&str> {
        self.stopped.as_deref()
    }

    fn check_running(&self) -> Result<(), NetBufferError> {
        match &self.stopped {
            Some(iface) => Err(NetBufferError::Stopped {
                iface: iface.clone(),
            }),
            None => Ok(()),
        }
    }

    fn stop(&mut self, iface: &str, e: &NetBufferError) {
        error!(vif = iface, error = %e, "output buffer failed: the group of vifs stops releasing (fail closed)");
        self.stopped.get_or_insert_with(|| iface.to_string());
    }

    /// Member `i`'s epoch `me` in the group's numbering.
    fn group_epoch(&self, i: usize, me: u64) -> Option<u64> {
        me.checked_sub(self.members[i].base?)?
            .checked_add(self.first?)
    }

    /// The group's epoch `e` in member `i`'s numbering.
    fn member_epoch(&self, i: usize, e: u64) -> Option<u64> {
        let m = &self.members[i];
        (e.checked_sub(self.first?)?).checked_add(m.base?)
    }

    /// If member `i` failed with `e` because its interface vanished (and it may), it
    /// leaves the group (its held frames go with the device) and true is returned.
    fn left_if_vanished(&mut self, i: usize, e: &NetBufferError) -> bool {
        let m = &self.members[i];
        if !m.may_vanish || self.single || (self.present)(&m.iface) {
            return false;
        }
        let m = self.members.remove(i);
        warn!(
            vif = %m.iface,
            error = %e,
            remaining = ?self.ifaces(),
            "the vif is gone (an emulated NIC, unplugged when the guest's PV drivers took over): it leaves the group, its held frames are dropped with the device, the other vifs go on"
        );
        self.vanished.push(m.iface);
        true
    }

    /// An error when no vif is left (every one vanished): nothing can be held any more.
    fn check_members(&self) -> Result<(), NetBufferError> {
        if self.members.is_empty() {
            return Err(NetBufferError::Failed(format!(
                "every vif of the group vanished ({})",
                self.vanished.join(", ")
            )));
        }
        Ok(())
    }

    async fn close_all(&mut self) -> Result<u64, NetBufferError> {
        // The group's epoch: after the first cut, one more than the last; at the first
        // cut, the first vif's number.
        let mut group = (self.closed > 0).then_some(self.closed + 1);
        let mut i = 0;
        while i < self.members.len() {
            let got = match self.members[i].buffer.close_epoch().await {
                Ok(e) => e,
                Err(e) => {
                    if self.left_if_vanished(i, &e) {
                        continue;
                    }
                    let iface = self.members[i].iface.clone();
                    self.stop(&iface, &e);
                    return Err(e);
                }
            };
            let g = *group.get_or_insert(got);
            let first = *self.first.get_or_insert(g);
            let m = &mut self.members[i];
            if m.base.is_none() && first == g {
                m.base = Some(got);
            }
            if self.member_epoch(i, g) != Some(got) {
                let iface = self.members[i].iface.clone();
                let e = NetBufferError::Diverged {
                    iface: iface.clone(),
                    expected: self.member_epoch(i, g).unwrap_or_default(),
                    got,
                };
                self.stop(&iface, &e);
                return Err(e);
            }
            i += 1;
        }
        self.check_members()?;
        let Some(group) = group else {
            return Err(NetBufferError::Failed("no vif closed the epoch".into()));
        };
        if self.closed == 0 {
            self.committed = group.saturating_sub(1);
        }
        self.closed = group;
        Ok(group)
    }

    /// Releases the group's epochs `committed+1 ..= epoch`, epoch by epoch across vifs.
    async fn commit_through(&mut self, epoch: u64) -> Result<Released, NetBufferError> {
        let mut total = Released {
            epoch,
            ..Released::default()
        };
        for e in self.committed + 1..=epoch {
            let mut i = 0;
            while i < self.members.len() {
                let r = match self.member_epoch(i, e) {
                    Some(me) => self.members[i].buffer.commit(me).await,
                    None => Err(NetBufferError::Failed(format!(
                        "no epoch number of {} for the group's epoch {e}",
                        self.members[i].iface
                    ))),
                };
                match r {
                    Ok(r) => {
                        total.frames += r.frames;
                        total.bytes += r.bytes;
                        i += 1;
                    }
                    Err(err) => {
                        if self.left_if_vanished(i, &err) {
                            continue;
                        }
                        let iface = self.members[i].iface.clone();
                        self.stop(&iface, &err);
                        return Err(err);
                    }
                }
            }
            self.check_members()?;
            self.committed = e;
        }
        Ok(total)
    }

    async fn open_all(&mut self) -> Result<Released, NetBufferError> {
        let mut total = Released::default();
        // Closed epochs first, in order across vifs; a failure here must not keep the
        // other vifs shut: opening is what a lost backup calls for.
        if self.stopped.is_none()
            && self.closed > self.committed
            && let Ok(r) = self.commit_through(self.closed).await
        {
            total.frames += r.frames;
            total.bytes += r.bytes;
        }
        let mut failed = Vec::new();
        let mut i = 0;
        while i < self.members.len() {
            match self.members[i].buffer.fail_open().await {
                Ok(r) => {
                    if i == 0 {
                        // In the group's numbering (the first vif may have vanished).
                        total.epoch = self.group_epoch(i, r.epoch).unwrap_or(r.epoch);
                    }
                    total.frames += r.frames;
                    total.bytes += r.bytes;
                }
                Err(e) => {
                    // A vif that is gone has nothing left to open.
                    if self.left_if_vanished(i, &e) {
                        continue;
                    }
                    let m = &self.members[i];
                    error!(vif = %m.iface, error = %e, "could not open the output buffer: this vif stays blocked");
                    failed.push(format!("{}: {e}", m.iface));
                }
            }
            i += 1;
        }
        if failed.is_empty() {
            Ok(total)
        } else {
            Err(NetBufferError::NotOpened { failed })
        }
    }
}

impl<B: NetBuffer> NetBuffer for VifGroup<B> {
    async fn close_epoch(&mut self) -> Result<u64, NetBufferError> {
        if self.single
            && let [only] = self.members.as_mut_slice()
        {
            return only.buffer.close_epoch().await;
        }
        self.check_running()?;
        self.close_all().await
    }

    async fn commit(&mut self, epoch: u64) -> Result<Released, NetBufferError> {
        if self.single
            && let [only] = self.members.as_mut_slice()
        {
            return only.buffer.commit(epoch).await;
        }
        self.check_running()?;
        if self.closed == 0 || epoch > self.closed {
            // Refused before anything is released on any vif.
            return Err(NetBufferError::EpochNotClosed {
                epoch,
                current: self.closed + 1,
            });
        }
        self.commit_through(epoch).await
    }

    async fn fail_open(&mut self) -> Result<Released, NetBufferError> {
        if self.single
            && let [only] = self.members.as_mut_slice()
        {
            return only.buffer.fail_open().await;
        }
        self.open_all().await
    }
}

#[cfg(test)]
mod tests;
