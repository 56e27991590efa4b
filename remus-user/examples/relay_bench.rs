//! Data side of `cargo xtask bench relay` (xtask cannot link remus-user: it must build
//! before the eBPF toolchain is installed). Prints one line of JSON.
//!
//! ```text
//! relay_bench stream   OUT PAGES DIRTY CHECKPOINTS   # writes a Remus stream to OUT
//! relay_bench compress PAGES DIRTY CHECKPOINTS CACHE # XOR+lz4 on incremental page data
//! relay_bench captured ZST OUT CACHE                  # a captured stream: OUT + compression
//! ```
use remus_user::compress;
use remus_user::stream::writer::{WriterConfig, write};
use remus_user::stream::{Event, Layer, Parser, libxc_type};

fn cfg(pages: &str, dirty: &str, checkpoints: &str) -> Result<WriterConfig, String> {
    let mut c = WriterConfig::pv(
        checkpoints
            .parse()
            .map_err(|e| format!("CHECKPOINTS: {e}"))?,
    );
    c.guest_pages = pages.parse().map_err(|e| format!("PAGES: {e}"))?;
    c.dirty_pages = dirty.parse().map_err(|e| format!("DIRTY: {e}"))?;
    Ok(c)
}

fn main() -> Result<(), String> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    match a.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["stream", out, pages, dirty, cps] => {
            let w = write(&cfg(pages, dirty, cps)?);
            std::fs::write(out, &w.bytes).map_err(|e| format!("writing {out}: {e}"))?;
            let ends: Vec<u64> = w
                .events
                .iter()
                .filter_map(|e| match *e {
                    Event::CheckpointComplete { end, .. } => Some(end),
                    _ => None,
                })
                .collect();
            println!("{}", serde_json::json!({ "bytes": w.bytes.len(), "ends": ends }));
        }
        ["compress", pages, dirty, cps, cache] => {
            let w = write(&cfg(pages, dirty, cps)?);
            let cache: usize = cache.parse().map_err(|e| format!("CACHE: {e}"))?;
            let prime = w.page_records_of(1);
            let n: u64 = cps.parse().map_err(|e| format!("CHECKPOINTS: {e}"))?;
            let records: Vec<&[u8]> = (2..=n).flat_map(|c| w.page_records_of(c)).collect();
            let m = compress::measure(&prime, &records, cache).map_err(|e| e.to_string())?;
            println!("{}", measurement_json(&m));
        }
        ["captured", zst, out, cache] => captured(zst, out, cache)?,
        _ => return Err("usage: relay_bench stream OUT PAGES DIRTY CHECKPOINTS | compress PAGES DIRTY CHECKPOINTS CACHE | captured ZST OUT CACHE".into()),
    }
    Ok(())
}

/// A captured stream: written out raw to `out`, its checkpoint ends, and how its page
/// data compresses (checkpoint 1 primes the caches, later ones are measured).
fn captured(zst: &str, out: &str, cache: &str) -> Result<(), String> {
    let file = std::fs::File::open(zst).map_err(|e| format!("{zst}: {e}"))?;
    let mut d = ruzstd::decoding::StreamingDecoder::new(std::io::BufReader::new(file))
        .map_err(|e| format!("{zst}: {e}"))?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut d, &mut bytes).map_err(|e| format!("{zst}: {e}"))?;
    std::fs::write(out, &bytes).map_err(|e| format!("writing {out}: {e}"))?;
    let mut events = Vec::new();
    Parser::new()
        .feed(&bytes, &mut events)
        .map_err(|e| format!("{zst}: {e}"))?;
    let (mut ends, mut pages) = (Vec::new(), Vec::<(u64, &[u8])>::new());
    let mut cp = 1u64;
    for e in &events {
        match *e {
            Event::Record {
                layer: Layer::Libxc,
                rtype: libxc_type::PAGE_DATA,
                start,
                end,
                ..
            } => pages.push((cp, &bytes[start as usize..end as usize])),
            Event::CheckpointComplete { checkpoint, end } => {
                ends.push(end);
                cp = checkpoint + 1;
            }
            _ => {}
        }
    }
    let cache: usize = cache.parse().map_err(|e| format!("CACHE: {e}"))?;
    let prime: Vec<&[u8]> = pages
        .iter()
        .filter(|(c, _)| *c == 1)
        .map(|(_, r)| *r)
        .collect();
    let rest: Vec<&[u8]> = pages
        .iter()
        .filter(|(c, _)| *c > 1)
        .map(|(_, r)| *r)
        .collect();
    let m = compress::measure(&prime, &rest, cache).map_err(|e| e.to_string())?;
    println!(
        "{}",
        serde_json::json!({
            "bytes": bytes.len(),
            "ends": ends,
            "compression": measurement_json(&m),
        })
    );
    Ok(())
}

/// What `cargo xtask bench relay` reads of a compression measurement.
fn measurement_json(m: &compress::Measurement) -> serde_json::Value {
    serde_json::json!({
        "records": m.records,
        "raw_bytes": m.raw_bytes,
        "encoded_bytes": m.encoded_bytes,
        "ratio": m.ratio(),
        "lz4_only_ratio": m.lz4_only_ratio(),
        "encode_mb_s": m.encode_mb_s(),
        "decode_mb_s": m.decode_mb_s(),
        "identical": m.identical,
    })
}
