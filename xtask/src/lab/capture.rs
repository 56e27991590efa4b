//! `cargo xtask lab capture-stream`: a real Remus stream as the stream parser's fixture.
//!
//! Owns: capturing stock `xl remus -s ''`'s stream teed to the share, cutting it after N
//! complete checkpoints, and writing `remus-user/tests/fixtures/remus-pv-stream.bin.zst`
//! with its README. It runs on host A alone (xl sends the stream to itself: no second
//! host is needed to capture one). Never touches: the lab's boot (vm.rs) or the scenarios;
//! the product's code (it only writes the fixture file the product's tests read).
use super::{
    build::tail_file, dom0, scenario::GUEST_MEM_MB, scenario::progress, topology::Host, vm,
};
use anyhow::{Context, Result, bail};
use std::{
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

/// Where each complete checkpoint of a Remus stream ends (right after its libxl
/// CHECKPOINT_END). Minimal, for cutting the fixture: xl header (32-byte magic, 4 u32,
/// optional data), libxl header (16 bytes), then records `u32 type, u32 len, body padded
/// to 8` in two layers whose type numbers collide, so the layer is tracked: libxl until
/// its one LIBXC_CONTEXT (type 1), then libxc (its image and domain headers, 24 + 16
/// bytes, once) until CHECKPOINT (0x0E) or END (0), then libxl until CHECKPOINT_END (4),
/// after which the next checkpoint's libxc records follow at once (no LIBXC_CONTEXT, no
/// headers again; docs: the shared notes on the stream, and remus-user's stream parser).
fn checkpoint_ends(b: &[u8]) -> Vec<usize> {
    let u32_at =
        |o: usize| -> Option<u32> { Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?)) };
    let mut ends = vec![];
    let Some(odl) = u32_at(44) else { return ends };
    let mut o = 48 + odl as usize + 16;
    let (mut libxc, mut headers_done) = (false, false);
    while let (Some(t), Some(l)) = (u32_at(o), u32_at(o + 4)) {
        if libxc && !headers_done {
            o += 40;
            headers_done = true;
            continue;
        }
        o += 8 + ((l as usize + 7) & !7);
        if o > b.len() {
            break;
        }
        match (libxc, t) {
            (false, 1) if !headers_done => libxc = true,
            (true, 0x0e) | (true, 0) => libxc = false,
            (false, 4) => {
                ends.push(o);
                libxc = true;
            }
            _ => {}
        }
    }
    ends
}

/// Captures a real Remus stream (stock `xl remus -s ''`, the stream teed to the share),
/// cuts it after `checkpoints_wanted` complete checkpoints after the initial copy, and
/// writes it zstd-compressed, with a README, as the stream parser's fixture.
pub fn capture(checkpoints_wanted: u64) -> Result<PathBuf> {
    let (bytes, info) = record(checkpoints_wanted)?;
    let ends = checkpoint_ends(&bytes);
    let want = checkpoints_wanted as usize + 1;
    if ends.len() < want {
        bail!(
            "the captured stream ({} bytes) holds only {} complete checkpoints, {want} wanted",
            bytes.len(),
            ends.len()
        );
    }
    let cut = &bytes[..ends[want - 1]];
    let cut_path = vm::share(Host::A).join("run/stream-cut.bin");
    fs::write(&cut_path, cut)?;
    let dir = crate::util::root().join("remus-user/tests/fixtures");
    fs::create_dir_all(&dir)?;
    let out = dir.join("remus-pv-stream.bin.zst");
    crate::util::run(
        crate::util::cmd("zstd")
            .args(["-19", "--long=27", "-T2", "-q", "-f", "-o"])
            .arg(&out)
            .arg(&cut_path),
    )?;
    let z = fs::metadata(&out)?.len();
    let facts = Facts {
        wanted: checkpoints_wanted,
        info: info.trim(),
        complete: want,
        cut_len: cut.len(),
        compressed: z,
        ends: &ends[..want],
    };
    fs::write(dir.join("README.md"), readme(&facts))?;
    eprintln!(
        "[lab] captured {} bytes, cut after {want} checkpoints at {} bytes, {z} bytes \
         compressed: {}",
        bytes.len(),
        cut.len(),
        out.display()
    );
    Ok(out)
}

/// Runs the capture in dom0 until `wanted` + 2 checkpoints started; returns the raw
/// stream and a line naming the Xen and kernel versions.
fn record(wanted: u64) -> Result<(Vec<u8>, String)> {
    let h = Host::A;
    let lab =
        |what: &str, args: &str, secs: u64| dom0::lab(h, what, args, Duration::from_secs(secs));
    lab("cleanup", "cleanup", 120)?;
    lab("guest up", &format!("guest-up {GUEST_MEM_MB}"), 300)?;
    lab("capture start", "remus-start capture", 60)?;
    let t = Instant::now();
    let count = || progress::checkpoints(progress::Source::XlLog, h);
    // One more than wanted: the first checkpoint is the initial copy; one more to be sure
    // the last wanted one is complete in the file.
    while count() < wanted + 2 {
        if t.elapsed() > Duration::from_secs(600) {
            bail!(
                "only {} checkpoints after 600 s:\n{}",
                count(),
                tail_file(&vm::share(h).join("run/sender.log"), 20)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    lab("stop sender", "stop-sender", 60)?;
    std::thread::sleep(Duration::from_secs(2));
    let raw = vm::share(h).join("run/stream.bin");
    let bytes = fs::read(&raw).with_context(|| format!("reading {}", raw.display()))?;
    let info = dom0::exec_ok(
        h,
        "versions",
        "echo \"Xen $(xl info | sed -n 's/^xen_version *: //p'), dom0 kernel $(uname -r)\"",
        Duration::from_secs(30),
    )
    .unwrap_or_default();
    lab("cleanup", "cleanup", 120)?;
    Ok((bytes, info))
}

/// What the fixture's README states.
struct Facts<'a> {
    wanted: u64,
    info: &'a str,
    complete: usize,
    cut_len: usize,
    compressed: u64,
    ends: &'a [usize],
}

fn readme(f: &Facts) -> String {
    format!(
        "# remus-pv-stream.bin.zst\n\n\
         A real Remus migration stream captured in the Xen lab by `cargo xtask lab \
         capture-stream --checkpoints {w}`:\n\
         `xl remus -F -n -i 200 -s '' guest \"sh -c 'tee stream.bin | xl migrate-receive -r -e'\"`.\n\n\
         - {info}\n\
         - guest: PV, {GUEST_MEM_MB} MiB, 1 vCPU, Debian 6.1 kernel, busybox initramfs running \
         the lab's counter service, `init_on_free=1`; most of the compressed size is the \
         guest kernel's own pages in the initial copy\n\
         - interval: 200 ms (`-i 200`); no network buffer (`-n`)\n\
         - {n} complete checkpoints: checkpoint 1 is the initial live copy, then \
         {w} more; the file is cut right after the libxl CHECKPOINT_END \
         of the last one (at byte {len})\n\
         - {len} bytes raw, {z} bytes compressed (`zstd -19 --long=27`; decompress with \
         `zstd -d --long=27`)\n\n\
         Layout: xl header + JSON config, libxl header, one libxl LIBXC_CONTEXT record \
         (type 1, once: it opens the libxc layer), the libxc image and domain headers \
         (once), then per checkpoint the libxc records up to CHECKPOINT (0x0E) and the \
         libxl records up to CHECKPOINT_END (4); the next checkpoint's libxc records follow \
         at once. Checkpoint record ends (byte offsets): {ends:?}\n",
        w = f.wanted,
        info = f.info,
        n = f.complete,
        len = f.cut_len,
        z = f.compressed,
        ends = f.ends,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(t: u32, body: &[u8]) -> Vec<u8> {
        let mut v = t.to_le_bytes().to_vec();
        v.extend((body.len() as u32).to_le_bytes());
        v.extend(body);
        v.resize(v.len().div_ceil(8) * 8, 0);
        v
    }

    /// A synthetic stream shaped like xl's: headers, the initial copy, two checkpoints and
    /// a torn third one. Type 1 means LIBXC_CONTEXT in libxl and PAGE_DATA in libxc.
    /// A checkpoint whose first libxc record is not PAGE_DATA (nothing dirty, or the
    /// vCPU records first): LIBXC_CONTEXT came once, so after a CHECKPOINT_END the stream
    /// is in libxc whatever the next record's type.
    #[test]
    fn a_checkpoint_that_does_not_start_with_page_data_is_still_counted() {
        let mut b = vec![b'X'; 32];
        for x in [0x0102_0304u32, 3, 0, 0] {
            b.extend(x.to_le_bytes());
        }
        b.extend([0u8; 16]); // libxl header
        b.extend(rec(1, b"")); // LIBXC_CONTEXT, once
        b.extend([0xffu8; 40]); // libxc image + domain headers, once
        b.extend(rec(1, &[7; 20])); // PAGE_DATA of the initial copy
        b.extend(rec(0x0e, b"")); // CHECKPOINT
        b.extend(rec(4, b"")); // libxl CHECKPOINT_END
        let first = b.len();
        b.extend(rec(5, &[0; 16])); // X86_PV_VCPU_BASIC: no page dirty this time
        b.extend(rec(4, &[0; 8])); // libxc type 4 (X86_PV_VCPU_BASIC's neighbour), not the end
        b.extend(rec(0x0e, b"")); // CHECKPOINT
        b.extend(rec(4, b"")); // libxl CHECKPOINT_END
        assert_eq!(checkpoint_ends(&b), vec![first, b.len()]);
    }

    #[test]
    fn checkpoint_ends_tracks_layers_and_ignores_a_torn_tail() {
        let mut b = vec![b'X'; 32];
        for x in [0x0102_0304u32, 3, 0, 5] {
            b.extend(x.to_le_bytes());
        }
        b.extend(b"{cfg}");
        b.extend([0u8; 16]); // libxl header
        b.extend(rec(1, b"")); // LIBXC_CONTEXT
        b.extend([0xffu8; 40]); // libxc image + domain headers
        let mut ends = vec![];
        for _ in 0..2 {
            b.extend(rec(1, &[7; 20])); // PAGE_DATA
            b.extend(rec(4, &[0; 8])); // libxc type 4 is not CHECKPOINT_END
            b.extend(rec(0x0e, b"")); // CHECKPOINT
            b.extend(rec(4, b"")); // libxl CHECKPOINT_END
            ends.push(b.len());
        }
        b.extend(rec(1, &[9; 100])[..50].iter());
        assert_eq!(checkpoint_ends(&b), ends);
    }
}
