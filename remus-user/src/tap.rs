//! The release helper device: a tap the holder writes released frames into.
//!
//! Owns: /dev/net/tun: creating a non-persistent tap (`IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR`) and writing `[virtio_net_hdr][frame]` into it. The tap's TC ingress
//! program (`remus_release`, attached by `datapath`) redirects each frame into the vif's
//! ingress path. The tap disappears when this process's fd closes (so a dead holder
//! leaves no helper behind). Never touches: BPF, netlink, frame contents.
use std::{
    fs::{File, OpenOptions},
    io::{self, IoSlice, Write},
    os::fd::AsRawFd,
};

/// Name prefix of every helper device remus-net creates ("rms" + vif ifindex).
pub const TAP_PREFIX: &str = "rms";

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("opening /dev/net/tun: {0} (is the tun module loaded? `modprobe tun`)")]
    Open(#[source] io::Error),
    #[error("creating tap {name}: {source}")]
    Create {
        name: String,
        #[source]
        source: io::Error,
    },
}

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
nix::ioctl_write_int!(tunsetiff, b'T', 202);

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates the tap `name` (fails if a device of that name exists).
    pub fn create(name: &str) -> Result<Tap, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        let n = name.len().min(libc::IFNAMSIZ - 1);
        req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        // SAFETY: TUNSETIFF reads and writes a struct ifreq; IfReq has its layout and size.
        unsafe { tunsetiff(file.as_raw_fd(), &mut req as *mut IfReq as u64) }.map_err(|e| {
            TapError::Create {
                name: name.to_string(),
                source: io::Error::from(e),
            }
        })?;
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Writes one frame: the virtio-net header, then the frame, with an optional 4-byte
    /// VLAN tag inserted after the two MAC addresses. One write() per frame: tun takes
    /// exactly one frame per write.
    pub fn send(
        &mut self,
        vnet: &[u8; 10],
        frame: &[u8],
        vlan: Option<&[u8; 4]>,
    ) -> io::Result<()> {
        let n = match vlan {
            None => self
                .file
                .write_vectored(&[IoSlice::new(vnet), IoSlice::new(frame)])?,
            Some(tag) => {
                let split = 12.min(frame.len());
                self.file.write_vectored(&[
                    IoSlice::new(vnet),
                    IoSlice::new(&frame[..split]),
                    IoSlice::new(tag),
                    IoSlice::new(&frame[split..]),
                ])?
            }
        };
        let want = vnet.len() + frame.len() + vlan.map_or(0, |t| t.len());
        if n != want {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write to {}: {n} of {want} bytes", self.name),
            ));
        }
        Ok(())
    }
}
