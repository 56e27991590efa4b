//! The kernel side of the buffer as aya sees it: the embedded eBPF object, its maps,
//! program attachment, and pins under `<host bpffs>/remus/<iface>/`.
//!
//! Owns: loading the object, reusing or creating pinned maps (after an ABI check),
//! deciding where pins live so that they outlive this process (`Pins`), attaching
//! `remus_vif_in` to the vif's TC ingress (tcx where the kernel has it and the pins
//! outlive the holder, a netlink clsact filter otherwise) so that it outlives this
//! process (fail closed), attaching `remus_release` to the helper tap, reading counters,
//! and tearing all of it down from a fresh process. Never touches: netlink beyond what
//! aya's tc helpers do (clsact creation), frame contents, the control socket.
//!
//! Where pins live, and why it matters: a tcx link stays attached only while something
//! references it (an fd or a pin); a pin lives in one bpffs instance, which goes away
//! when its last mount does. `ip netns exec` and containers give a process a private
//! mount namespace (with a fresh /sys and no bpffs): pins made there die with the last
//! process of that namespace, and the link, and the hold, with them. So pins go into the
//! bpffs of the kernel's initial mount namespace, which never ends: /sys/fs/bpf when
//! this process is in that namespace, else through kthreadd's root
//! (/proc/2/root/sys/fs/bpf; kthreadd lives in the initial mount namespace and is
//! visible only in the initial pid namespace). Where neither is possible (a container
//! with its own pid namespace), pins are private, and the capture program is attached as
//! a netlink cls_bpf filter, which stays attached with no pin and no process at all.
use std::{
    fs,
    io::ErrorKind,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapData, PerCpuArray, RingBuf},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, TcAttachOptions},
    },
    util::KernelVersion,
};
use remus_common::{
    ABI_VERSION, CTL_ABI, MAP_CONTROL, MAP_RING, MAP_STATS, PROG_RELEASE, PROG_VIF_IN, Stat,
};
use serde::{Deserialize, Serialize};

/// The eBPF object built by build.rs (nightly, bpfel-unknown-none, -Ctarget-cpu=v3).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/remus-ebpf"));

/// Root of every pin this project makes.
pub const PIN_ROOT: &str = "/sys/fs/bpf/remus";
/// Pin name of the tcx link of `remus_vif_in` (absent for netlink attachment).
pub const PIN_LINK_VIF: &str = "link_vif_in";
/// Pin name of the `remus_vif_in` program (both attach kinds; for inspection).
pub const PIN_PROG_VIF: &str = "prog_vif_in";

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("bpffs is not mounted at /sys/fs/bpf and mounting it failed: {0}")]
    Bpffs(std::io::Error),
    #[error("loading the eBPF object failed: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("the kernel refused the eBPF program {prog}: {source}")]
    Verify {
        prog: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error(
        "pinned objects in {dir} were made by ABI version {found}, this remus-net speaks {ABI_VERSION}: \
         run `remus-net detach {iface}` with the version that made them, or remove {dir}"
    )]
    AbiMismatch {
        dir: String,
        iface: String,
        found: u64,
    },
    #[error("attaching {prog} to {iface} failed: {source}")]
    Attach {
        prog: &'static str,
        iface: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("map {map}: {what}")]
    Map { map: &'static str, what: String },
    #[error("pin {path}: {what}")]
    Pin { path: String, what: String },
    #[error(
        "--attach tcx on {iface} cannot fail closed here: pins ({dir}) would die with this \
         process's private mount namespace (a container?), and the tcx link with them. \
         Use --attach auto (a netlink filter that needs no pin) or run remus-net in the \
         host's mount namespace"
    )]
    PinsNotPersistent { iface: String, dir: String },
}

impl DatapathError {
    /// True when the failure means "this kernel/environment cannot do BPF" rather than a
    /// bug or a transient condition (drives exit code 3): bpffs cannot be had, or a BPF
    /// syscall somewhere in the error's chain of sources failed with EPERM or ENOSYS.
    pub fn is_unsupported(&self) -> bool {
        // The boxed aya errors are opened here: a `Box<E>` in the chain is not an `E`.
        let inner: &(dyn std::error::Error + 'static) = match self {
            DatapathError::Bpffs(_) | DatapathError::PinsNotPersistent { .. } => return true,
            DatapathError::Load(e) => &**e,
            DatapathError::Verify { source, .. } | DatapathError::Attach { source, .. } => {
                &**source
            }
            other => other,
        };
        errno_in_chain(inner).is_some_and(|e| e == libc::EPERM || e == libc::ENOSYS)
    }
}

/// The first OS error number in `e`'s chain of sources. aya keeps the syscall's
/// `io::Error` as the source of its load errors, but behind `#[error(transparent)]`
/// wrappers (tc, map, program I/O errors) it is no source of its own: those are opened
/// by type.
pub fn errno_in_chain(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(errno) = errno_here(err) {
            return Some(errno);
        }
        cur = err.source();
    }
    None
}

fn errno_here(err: &(dyn std::error::Error + 'static)) -> Option<i32> {
    use aya::{maps::MapError, programs::ProgramError};
    let of_tc = |t: &tc::TcError| match t {
        tc::TcError::IoError(io) => io.raw_os_error(),
        tc::TcError::NetlinkError(n) => n.raw_os_error(),
        _ => None,
    };
    if let Some(io) = err.downcast_ref::<std::io::Error>() {
        return io.raw_os_error();
    }
    if let Some(t) = err.downcast_ref::<tc::TcError>() {
        return of_tc(t);
    }
    if let Some(MapError::IoError(io)) = err.downcast_ref::<MapError>() {
        return io.raw_os_error();
    }
    match err.downcast_ref::<ProgramError>()? {
        ProgramError::IOError(io) | ProgramError::MapError(MapError::IoError(io)) => {
            io.raw_os_error()
        }
        ProgramError::TcError(t) => of_tc(t),
        ProgramError::NetlinkError(n) => n.raw_os_error(),
        _ => None,
    }
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |e| DatapathError::Map {
        map,
        what: e.to_string(),
    }
}

/// How `remus_vif_in` is attached (decides how a fresh process detaches it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachKind {
    /// A tcx link (kernel >= 6.6), pinned so it survives the holder.
    Tcx,
    /// A cls_bpf direct-action filter under clsact (older kernels, e.g. dom0's 6.1).
    Netlink {
        /// Whether we added the clsact qdisc (then detach removes it).
        created_clsact: bool,
    },
}

impl AttachKind {
    pub fn name(self) -> &'static str {
        match self {
            AttachKind::Tcx => "tcx",
            AttachKind::Netlink { .. } => "netlink-clsact",
        }
    }
}

/// Which attach mechanism to use. `Auto` picks tcx on kernels >= 6.6.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachMode {
    #[default]
    Auto,
    Tcx,
    Netlink,
}

impl AttachMode {
    fn use_tcx(self) -> bool {
        match self {
            AttachMode::Auto => kernel_has_tcx(),
            AttachMode::Tcx => true,
            AttachMode::Netlink => false,
        }
    }
}

/// tcx (multi-prog TC attachment through bpf links) arrived in Linux 6.6.
pub fn kernel_has_tcx() -> bool {
    KernelVersion::current()
        .map(|v| v >= KernelVersion::new(6, 6, 0))
        .unwrap_or(false)
}

/// Pin directory of one interface under `root`. bpffs refuses names containing '.'
/// (EPERM), and every Xen vif has one (vif5.0): '.' becomes ':', which no interface name
/// can contain.
pub fn pin_dir_in(root: &Path, iface: &str) -> PathBuf {
    root.join(iface.replace('.', ":"))
}

/// Whether pins outlive the process that made them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PinPlace {
    /// The bpffs of the kernel's initial mount namespace: pins outlive every process.
    Host,
    /// A bpffs of this process's own mount namespace: pins die with its last process.
    Private,
}

/// Where this process puts (and looks for) pins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pins {
    /// The directory holding one subdirectory per interface.
    pub root: PathBuf,
    pub place: PinPlace,
}

/// kthreadd's root seen from here: the initial mount namespace's root directory.
const KTHREADD_ROOT: &str = "/proc/2/root";

/// kthreadd (pid 2, parent 0) is visible only from the initial pid namespace; it lives in
/// the initial mount namespace.
fn kthreadd_visible() -> bool {
    let Ok(st) = fs::read_to_string("/proc/2/status") else {
        return false;
    };
    st.lines().any(|l| l == "Name:\tkthreadd") && st.lines().any(|l| l == "PPid:\t0")
}

/// True if this process is in the kernel's initial mount namespace.
fn in_initial_mount_ns() -> bool {
    use std::os::unix::fs::MetadataExt;
    let ino = |p: &str| fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    kthreadd_visible()
        && ino("/proc/self/ns/mnt").is_some()
        && ino("/proc/self/ns/mnt") == ino("/proc/2/ns/mnt")
}

fn is_bpffs(p: &Path) -> bool {
    nix::sys::statfs::statfs(p)
        .map(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
        .unwrap_or(false)
}

impl Pins {
    /// Decides where pins go from this process (see the module docs); mounts bpffs on
    /// /sys/fs/bpf where that is where they go and it is not mounted yet.
    pub fn resolve() -> Result<Pins, DatapathError> {
        let host_root = Path::new(KTHREADD_ROOT).join("sys/fs/bpf");
        if in_initial_mount_ns() {
            ensure_bpffs()?;
            Ok(Pins {
                root: PathBuf::from(PIN_ROOT),
                place: PinPlace::Host,
            })
        } else if kthreadd_visible() && is_bpffs(&host_root) {
            Ok(Pins {
                root: host_root.join("remus"),
                place: PinPlace::Host,
            })
        } else {
            ensure_bpffs()?;
            Ok(Pins {
                root: PathBuf::from(PIN_ROOT),
                place: PinPlace::Private,
            })
        }
    }

    /// The pin directory of `iface`.
    pub fn dir(&self, iface: &str) -> PathBuf {
        pin_dir_in(&self.root, iface)
    }

    /// The attach mechanism `mode` comes to here: private pins cannot keep a tcx link
    /// alive after this process, so `Auto` becomes the netlink filter and an explicit
    /// `Tcx` is refused.
    pub fn attach_mode(&self, mode: AttachMode, iface: &str) -> Result<AttachMode, DatapathError> {
        match (self.place, mode) {
            (PinPlace::Host, m) => Ok(m),
            (PinPlace::Private, AttachMode::Tcx) => Err(DatapathError::PinsNotPersistent {
                iface: iface.to_string(),
                dir: self.dir(iface).display().to_string(),
            }),
            (PinPlace::Private, _) => Ok(AttachMode::Netlink),
        }
    }
}

/// Mounts bpffs on /sys/fs/bpf if it is not mounted (it is not, by default, in a fresh
/// `ip netns exec` mount namespace or on some hosts).
pub fn ensure_bpffs() -> Result<(), DatapathError> {
    let is_bpffs = |p: &str| {
        nix::sys::statfs::statfs(p)
            .map(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
            .unwrap_or(false)
    };
    if is_bpffs("/sys/fs/bpf") {
        return Ok(());
    }
    fs::create_dir_all("/sys/fs/bpf").map_err(DatapathError::Bpffs)?;
    nix::mount::mount(
        Some("bpf"),
        "/sys/fs/bpf",
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| DatapathError::Bpffs(std::io::Error::from(e)))?;
    Ok(())
}

/// Summed counters of the data plane.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelStats {
    pub captured_frames: u64,
    pub captured_bytes: u64,
    pub passed_released_frames: u64,
    pub passed_through_frames: u64,
    pub dropped_oversize_frames: u64,
    pub dropped_ring_full_frames: u64,
    pub dropped_load_error_frames: u64,
    pub redirected_frames: u64,
    pub redirect_error_frames: u64,
    pub dropped_runt_frames: u64,
}

impl KernelStats {
    fn from_slots(v: &[u64]) -> Self {
        let g = |s: Stat| v.get(s as usize).copied().unwrap_or(0);
        KernelStats {
            captured_frames: g(Stat::Captured),
            captured_bytes: g(Stat::CapturedBytes),
            passed_released_frames: g(Stat::PassedReleased),
            passed_through_frames: g(Stat::PassedThrough),
            dropped_oversize_frames: g(Stat::DropOversize),
            dropped_ring_full_frames: g(Stat::DropRingFull),
            dropped_load_error_frames: g(Stat::DropLoad),
            redirected_frames: g(Stat::Redirected),
            redirect_error_frames: g(Stat::RedirectErr),
            dropped_runt_frames: g(Stat::DropRunt),
        }
    }
}

fn sum_stats(stats: &PerCpuArray<MapData, u64>) -> Result<KernelStats, DatapathError> {
    let mut slots = Vec::with_capacity(Stat::ALL.len());
    for i in 0..Stat::ALL.len() as u32 {
        let v = stats.get(&i, 0).map_err(map_err(MAP_STATS))?;
        slots.push(v.iter().sum());
    }
    Ok(KernelStats::from_slots(&slots))
}

/// The loaded object with its maps, owned by the holder process.
pub struct Loaded {
    ebpf: Ebpf,
    control: Array<MapData, u64>,
    stats: PerCpuArray<MapData, u64>,
    pin_dir: PathBuf,
    /// True when pinned maps from an earlier holder were reused.
    pub reused: bool,
}

/// The TC program `name` of the object.
fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::Map {
            map: "programs",
            what: format!("object has no program {name}"),
        })?
        .try_into()
        .map_err(|e| DatapathError::Verify {
            prog: name,
            source: Box::new(e),
        })
}

/// Reads slot `CTL_ABI` of a pinned control map, if there is one.
fn pinned_abi(dir: &Path) -> Result<Option<u64>, DatapathError> {
    let path = dir.join(MAP_CONTROL);
    match MapData::from_pin(&path) {
        Ok(md) => {
            let map = Map::from_map_data(md).map_err(map_err(MAP_CONTROL))?;
            let arr: Array<MapData, u64> = map.try_into().map_err(map_err(MAP_CONTROL))?;
            Ok(Some(arr.get(&CTL_ABI, 0).map_err(map_err(MAP_CONTROL))?))
        }
        Err(_) if !path.exists() => Ok(None),
        Err(e) => Err(DatapathError::Pin {
            path: path.display().to_string(),
            what: e.to_string(),
        }),
    }
}

impl Loaded {
    /// Loads the object, creating the maps under `dir` or reusing pinned ones (after
    /// checking their ABI version). `ring_bytes` must be a power of two multiple of the
    /// page size; it is ignored when a pinned ring is reused.
    /// `dir` must lie in a mounted bpffs (`Pins::resolve` sees to that).
    pub fn load(dir: &Path, iface: &str, ring_bytes: u32) -> Result<Loaded, DatapathError> {
        let reused = match pinned_abi(dir)? {
            Some(v) if v != ABI_VERSION && v != 0 => {
                return Err(DatapathError::AbiMismatch {
                    dir: dir.display().to_string(),
                    iface: iface.to_string(),
                    found: v,
                });
            }
            Some(_) => true,
            None => false,
        };
        fs::create_dir_all(dir).map_err(|e| DatapathError::Pin {
            path: dir.display().to_string(),
            what: e.to_string(),
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(dir)
            .map_max_entries(MAP_RING, ring_bytes)
            .load(OBJECT)
            .map_err(|e| DatapathError::Load(Box::new(e)))?;
        for prog in [PROG_VIF_IN, PROG_RELEASE] {
            classifier(&mut ebpf, prog)?
                .load()
                .map_err(|e| DatapathError::Verify {
                    prog,
                    source: Box::new(e),
                })?;
        }
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(DatapathError::Map {
                map: name,
                what: "missing from the object".into(),
            })
        };
        let control: Array<MapData, u64> = take(&mut ebpf, MAP_CONTROL)?
            .try_into()
            .map_err(map_err(MAP_CONTROL))?;
        let stats: PerCpuArray<MapData, u64> = take(&mut ebpf, MAP_STATS)?
            .try_into()
            .map_err(map_err(MAP_STATS))?;
        let mut loaded = Loaded {
            ebpf,
            control,
            stats,
            pin_dir: dir.to_path_buf(),
            reused,
        };
        loaded.set_control(CTL_ABI, ABI_VERSION)?;
        Ok(loaded)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn set_control(&mut self, slot: u32, value: u64) -> Result<(), DatapathError> {
        self.control
            .set(slot, value, 0)
            .map_err(map_err(MAP_CONTROL))
    }

    pub fn control(&self, slot: u32) -> Result<u64, DatapathError> {
        self.control.get(&slot, 0).map_err(map_err(MAP_CONTROL))
    }

    pub fn stats(&self) -> Result<KernelStats, DatapathError> {
        sum_stats(&self.stats)
    }

    /// Takes the ring buffer out of the object (for the holder's reader).
    pub fn take_ring(&mut self) -> Result<RingBuf<MapData>, DatapathError> {
        self.ebpf
            .take_map(MAP_RING)
            .ok_or(DatapathError::Map {
                map: MAP_RING,
                what: "missing from the object (already taken?)".into(),
            })?
            .try_into()
            .map_err(map_err(MAP_RING))
    }

    fn prog(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DatapathError> {
        classifier(&mut self.ebpf, name)
    }

    /// Attaches `remus_vif_in` to the vif's TC ingress so that it outlives this process.
    /// If a pinned tcx link from an earlier holder exists, the program behind it is
    /// replaced atomically (no frame passes unheld in between).
    pub fn attach_vif(
        &mut self,
        iface: &str,
        mode: AttachMode,
    ) -> Result<AttachKind, DatapathError> {
        let link_pin = self.pin_dir.join(PIN_LINK_VIF);
        let kind = if link_pin.exists() {
            self.take_over_tcx(iface, &link_pin)?
        } else if mode.use_tcx() {
            self.attach_tcx(iface, &link_pin)?
        } else {
            self.attach_netlink(iface)?
        };
        let prog_pin = self.pin_dir.join(PIN_PROG_VIF);
        let prog = self.prog(PROG_VIF_IN)?;
        if prog_pin.exists() {
            let _ = fs::remove_file(&prog_pin);
        }
        prog.pin(&prog_pin).map_err(|e| pin_err(&prog_pin, &e))?;
        Ok(kind)
    }

    /// Takeover: replaces the program behind the dead holder's pinned tcx link.
    fn take_over_tcx(&mut self, iface: &str, link_pin: &Path) -> Result<AttachKind, DatapathError> {
        let old = PinnedLink::from_pin(link_pin).map_err(|e| pin_err(link_pin, &e))?;
        let fd_link = FdLink::from(old);
        let prog = self.prog(PROG_VIF_IN)?;
        let link = fd_link
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| pin_err(link_pin, &e))?;
        let id = prog
            .attach_to_link(link)
            .map_err(attach_err(PROG_VIF_IN, iface))?;
        let link = prog.take_link(id).map_err(attach_err(PROG_VIF_IN, iface))?;
        // The link stays pinned at the same path; dropping our fd keeps it alive.
        drop(link);
        Ok(AttachKind::Tcx)
    }

    /// A new tcx link, first in the hook's order, pinned so it outlives this process.
    fn attach_tcx(&mut self, iface: &str, link_pin: &Path) -> Result<AttachKind, DatapathError> {
        let prog = self.prog(PROG_VIF_IN)?;
        let opts = TcAttachOptions::TcxOrder(LinkOrder::first());
        let id = prog
            .attach_with_options(iface, TcAttachType::Ingress, opts)
            .map_err(attach_err(PROG_VIF_IN, iface))?;
        let link = prog.take_link(id).map_err(attach_err(PROG_VIF_IN, iface))?;
        let fd_link: FdLink = link
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| pin_err(link_pin, &e))?;
        fd_link.pin(link_pin).map_err(|e| pin_err(link_pin, &e))?;
        Ok(AttachKind::Tcx)
    }

    /// A cls_bpf direct-action filter under clsact: it stays with no process at all.
    fn attach_netlink(&mut self, iface: &str) -> Result<AttachKind, DatapathError> {
        let created_clsact = add_clsact(iface, PROG_VIF_IN)?;
        let prog = self.prog(PROG_VIF_IN)?;
        let opts = TcAttachOptions::Netlink(NlOptions::default());
        let id = prog
            .attach_with_options(iface, TcAttachType::Ingress, opts)
            .map_err(attach_err(PROG_VIF_IN, iface))?;
        let link = prog.take_link(id).map_err(attach_err(PROG_VIF_IN, iface))?;
        // Fail closed: the filter must outlive this process. Forgetting the link
        // keeps aya from removing the filter on drop; detach removes it by name.
        std::mem::forget(link);
        Ok(AttachKind::Netlink { created_clsact })
    }

    /// Attaches `remus_release` to the helper tap's ingress. Not pinned: it goes away
    /// with the tap, which goes away with this process.
    pub fn attach_release(&mut self, tap: &str) -> Result<(), DatapathError> {
        if !kernel_has_tcx() {
            add_clsact(tap, PROG_RELEASE)?;
        }
        let prog = self.prog(PROG_RELEASE)?;
        prog.attach(tap, TcAttachType::Ingress)
            .map_err(attach_err(PROG_RELEASE, tap))?;
        Ok(())
    }

    /// The loaded (not attached) capture program, for BPF_PROG_TEST_RUN in tests.
    pub fn vif_program(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        self.prog(PROG_VIF_IN)
    }

    pub fn release_program(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        self.prog(PROG_RELEASE)
    }
}

fn pin_err(p: &Path, e: &dyn std::fmt::Display) -> DatapathError {
    DatapathError::Pin {
        path: p.display().to_string(),
        what: e.to_string(),
    }
}

fn attach_err(
    prog: &'static str,
    iface: &str,
) -> impl FnOnce(aya::programs::ProgramError) -> DatapathError {
    let iface = iface.to_string();
    move |e| DatapathError::Attach {
        prog,
        iface,
        source: Box::new(e),
    }
}

/// Adds a clsact qdisc to `iface` for `prog`; true if we added it, false if it was there.
fn add_clsact(iface: &str, prog: &'static str) -> Result<bool, DatapathError> {
    match tc::qdisc_add_clsact(iface) {
        Ok(()) => Ok(true),
        Err(e) if is_eexist(&e) => Ok(false),
        Err(e) => Err(attach_err(prog, iface)(aya::programs::ProgramError::from(
            e,
        ))),
    }
}

/// The clsact qdisc is already there (ours from an earlier holder, or someone else's).
fn is_eexist(e: &tc::TcError) -> bool {
    matches!(e, tc::TcError::AlreadyAttached) || errno_in_chain(e) == Some(libc::EEXIST)
}

/// No filter of that name on the interface (aya reports it as `io::ErrorKind::NotFound`).
fn is_no_filter(e: &tc::TcError) -> bool {
    let not_found = |io: &std::io::Error| io.kind() == ErrorKind::NotFound;
    matches!(e, tc::TcError::IoError(io) if not_found(io))
        || errno_in_chain(e).is_some_and(|n| n == libc::ENOENT || n == libc::ENODEV)
}

/// What a fresh process learns from pins left behind (holder dead or alive).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PinnedState {
    pub abi: Option<u64>,
    pub epoch: u64,
    pub mode: u64,
    pub stats: KernelStats,
    pub tcx_link_pinned: bool,
}

/// Reads control slots and counters from the pins of `dir`.
pub fn read_pinned(dir: &Path) -> Result<Option<PinnedState>, DatapathError> {
    let cpath = dir.join(MAP_CONTROL);
    if !cpath.exists() {
        return Ok(None);
    }
    let open = |name: &'static str| -> Result<Map, DatapathError> {
        let md = MapData::from_pin(dir.join(name)).map_err(map_err(name))?;
        Map::from_map_data(md).map_err(map_err(name))
    };
    let control: Array<MapData, u64> = open(MAP_CONTROL)?
        .try_into()
        .map_err(map_err(MAP_CONTROL))?;
    let stats: PerCpuArray<MapData, u64> =
        open(MAP_STATS)?.try_into().map_err(map_err(MAP_STATS))?;
    let get = |s: u32| control.get(&s, 0).map_err(map_err(MAP_CONTROL));
    Ok(Some(PinnedState {
        abi: Some(get(CTL_ABI)?),
        epoch: get(remus_common::CTL_EPOCH)?,
        mode: get(remus_common::CTL_MODE)?,
        stats: sum_stats(&stats)?,
        tcx_link_pinned: dir.join(PIN_LINK_VIF).exists(),
    }))
}

/// Removes the capture program from the vif and every pin of `dir`, from any process.
/// `kind` comes from the holder's state file; without it, both mechanisms are tried.
/// `iface_present` says whether the vif still exists (a destroyed guest's vif does not).
/// Returns human-readable notes on what was removed. The clsact qdisc, if remus-net
/// added it, is the caller's to delete (through `netlink`).
pub fn teardown(
    iface: &str,
    dir: &Path,
    kind: Option<AttachKind>,
    iface_present: bool,
) -> Result<Vec<String>, DatapathError> {
    let mut notes = Vec::new();
    let link_pin = dir.join(PIN_LINK_VIF);
    if link_pin.exists() {
        match PinnedLink::from_pin(&link_pin) {
            Ok(p) => {
                let fd = p.unpin().map_err(|e| DatapathError::Pin {
                    path: link_pin.display().to_string(),
                    what: e.to_string(),
                })?;
                // Dropping the last reference to a tcx link detaches it.
                drop(fd);
                notes.push(format!("removed tcx link of {PROG_VIF_IN}"));
            }
            Err(e) => {
                let _ = fs::remove_file(&link_pin);
                notes.push(format!("removed stale link pin ({e})"));
            }
        }
    }
    if !matches!(kind, Some(AttachKind::Tcx)) && iface_present {
        match tc::qdisc_detach_program(iface, TcAttachType::Ingress, PROG_VIF_IN) {
            Ok(()) => notes.push(format!("removed clsact filter {PROG_VIF_IN}")),
            Err(e) if is_no_filter(&e) => {}
            Err(e) => notes.push(format!("no clsact filter to remove ({e})")),
        }
    }
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(|e| DatapathError::Pin {
            path: dir.display().to_string(),
            what: e.to_string(),
        })?;
        notes.push(format!("removed pins in {}", dir.display()));
    }
    Ok(notes)
}

/// The raw fd of a ring buffer, for registering with the async reactor.
pub fn ring_fd(ring: &RingBuf<MapData>) -> std::os::fd::RawFd {
    ring.as_fd().as_raw_fd()
}

/// True if `e` says the pin or map simply is not there.
pub fn is_not_found(e: &std::io::Error) -> bool {
    e.kind() == ErrorKind::NotFound
}

#[cfg(test)]
mod tests {
    use super::*;
    use aya::programs::ProgramError;

    fn attach_error(e: tc::TcError) -> DatapathError {
        DatapathError::Attach {
            prog: PROG_VIF_IN,
            iface: "vif1.0".into(),
            source: Box::new(ProgramError::from(e)),
        }
    }

    fn os(errno: i32) -> tc::TcError {
        tc::TcError::IoError(std::io::Error::from_raw_os_error(errno))
    }

    #[test]
    fn unsupported_is_decided_by_the_errno_in_the_chain() {
        assert!(attach_error(os(libc::EPERM)).is_unsupported());
        assert!(attach_error(os(libc::ENOSYS)).is_unsupported());
        assert!(!attach_error(os(libc::EINVAL)).is_unsupported());
        assert!(DatapathError::Bpffs(std::io::Error::other("no bpffs")).is_unsupported());
    }

    #[test]
    fn text_that_names_an_errno_does_not_count() {
        let e = DatapathError::Pin {
            path: "/sys/fs/bpf/remus/x".into(),
            what: "EPERM Operation not permitted".into(),
        };
        assert!(!e.is_unsupported());
        let e = attach_error(tc::TcError::IoError(std::io::Error::other("EPERM")));
        assert!(!e.is_unsupported());
    }

    #[test]
    fn qdisc_and_filter_answers_are_told_apart_by_errno() {
        assert!(is_eexist(&os(libc::EEXIST)));
        assert!(is_eexist(&tc::TcError::AlreadyAttached));
        assert!(!is_eexist(&os(libc::EPERM)));
        let missing = tc::TcError::IoError(std::io::Error::new(ErrorKind::NotFound, "none"));
        assert!(is_no_filter(&missing));
        assert!(is_no_filter(&os(libc::ENOENT)));
        assert!(!is_no_filter(&os(libc::EPERM)));
    }

    #[test]
    fn pin_dirs_of_xen_vifs_have_no_dot() {
        let root = Path::new(PIN_ROOT);
        assert_eq!(pin_dir_in(root, "vif5.0"), root.join("vif5:0"));
        assert_eq!(pin_dir_in(root, "eth0"), root.join("eth0"));
    }

    #[test]
    fn private_pins_turn_auto_into_the_netlink_filter_and_refuse_tcx() {
        let private = Pins {
            root: PathBuf::from(PIN_ROOT),
            place: PinPlace::Private,
        };
        let m = |mode| private.attach_mode(mode, "vif1.0");
        assert_eq!(m(AttachMode::Auto).ok(), Some(AttachMode::Netlink));
        assert_eq!(m(AttachMode::Netlink).ok(), Some(AttachMode::Netlink));
        match m(AttachMode::Tcx) {
            Err(e @ DatapathError::PinsNotPersistent { .. }) => assert!(e.is_unsupported()),
            other => panic!("expected a refusal, got {other:?}"),
        }
        let host = Pins {
            place: PinPlace::Host,
            ..private
        };
        for mode in [AttachMode::Auto, AttachMode::Tcx, AttachMode::Netlink] {
            assert_eq!(host.attach_mode(mode, "vif1.0").ok(), Some(mode));
        }
    }
}
