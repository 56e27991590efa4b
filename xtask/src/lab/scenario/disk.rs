//! The scenario `disk`: what the guest's counter service says of its disk (`lab.sh
//! disk-check`, the service's `disk?` line), typed, and the judgement of it.
//!
//! The service (lab/counter, `--disk /dev/xvda`) writes value N to block N of its disk
//! (O_DIRECT, fdatasync) before it replies N, and before each value checks that block N-1
//! holds N-1 and block N is empty, i.e. that the disk is exactly where its memory is. So
//! after a failover: the backup guest's first request after its resume checks the disk
//! it resumed on against the memory it resumed with, every value the client ever got is
//! on the disk (blocks 1..=M hold 1..=M), and nothing on it is newer than memory (nothing
//! written past M).
//!
//! Owns: the record's shape, its parsing and the judgement. Never touches: the lab (the
//! acts run `lab.sh disk-check` and hand its output here).
use serde::Serialize;

/// The backup's `remus disk receive` listens on the replication link at this port.
pub const DISK_PORT: u16 = 7789;

/// One `disk?` answer, with what the client had seen when it was asked.
#[derive(Serialize, Debug, Clone, Default, PartialEq)]
pub struct DiskCheck {
    /// "protected" (on the primary, before the failure) or "after failover" (the backup).
    pub when: String,
    /// The counter in the guest's memory.
    pub mem: u64,
    /// The highest H such that blocks 1..=H hold 1..=H.
    pub contiguous: u64,
    /// Written blocks beyond `mem` (values memory never reached).
    pub newer: u64,
    /// Requests checked against the disk so far, and how many found it elsewhere.
    pub checks: u64,
    pub mismatches: u64,
    /// The first block or check that was wrong, if any.
    pub first: Option<String>,
    /// The highest value the client had received before the question was asked.
    pub client_max: Option<u64>,
    /// The host's disk daemon (`remus disk status -j`), as it printed it.
    pub daemon: String,
}

/// Parses `lab.sh disk-check`'s output (`guest: disk mem=… …` and `daemon: …`).
pub fn parse(out: &str, when: &str, client_max: Option<u64>) -> Result<DiskCheck, String> {
    let guest = out
        .lines()
        .find_map(|l| l.strip_prefix("guest: "))
        .ok_or_else(|| format!("no `guest:` line in {out:?}"))?;
    let rest = guest
        .strip_prefix("disk mem=")
        .map(|r| format!("mem={r}"))
        .ok_or_else(|| format!("the guest did not report its disk: {guest:?}"))?;
    let mut c = DiskCheck {
        when: when.into(),
        client_max,
        daemon: out
            .lines()
            .find_map(|l| l.strip_prefix("daemon: "))
            .unwrap_or_default()
            .into(),
        ..Default::default()
    };
    let num = |v: &str, k: &str| {
        v.parse::<u64>()
            .map_err(|_| format!("{k}={v:?} is not a number in {guest:?}"))
    };
    let mut seen = 0;
    for w in rest.split_whitespace() {
        let Some((k, v)) = w.split_once('=') else {
            continue;
        };
        match k {
            "mem" => c.mem = num(v, k)?,
            "contiguous" => c.contiguous = num(v, k)?,
            "newer" => c.newer = num(v, k)?,
            "checks" => c.checks = num(v, k)?,
            "mismatches" => c.mismatches = num(v, k)?,
            "first" => c.first = Some(v.replace('_', " ")),
            _ => continue,
        }
        seen += 1;
    }
    if seen < 5 {
        return Err(format!("an incomplete disk report: {guest:?}"));
    }
    Ok(c)
}

/// What is wrong with a check (empty: the disk agrees with memory and with the client).
pub fn problems(c: &DiskCheck) -> Vec<String> {
    let mut bad = vec![];
    if c.mismatches > 0 {
        bad.push(format!(
            "{} of {} requests found the disk elsewhere than memory (first: {})",
            c.mismatches,
            c.checks,
            c.first.clone().unwrap_or_default()
        ));
    }
    if c.checks == 0 {
        bad.push("the service checked no request against its disk".into());
    }
    if c.contiguous != c.mem {
        bad.push(format!(
            "the disk holds 1..={} but memory is at {} (first: {})",
            c.contiguous,
            c.mem,
            c.first.clone().unwrap_or_default()
        ));
    }
    if c.newer > 0 {
        bad.push(format!(
            "{} blocks on the disk are newer than memory ({})",
            c.newer, c.mem
        ));
    }
    if let Some(m) = c.client_max
        && m > c.contiguous
    {
        bad.push(format!(
            "the client received {m} but the disk holds only 1..={}",
            c.contiguous
        ));
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "guest: disk mem=120 contiguous=120 newer=0 checks=120 mismatches=0\n\
                      daemon: [{\"name\":\"guestdisk\"}]\n";

    #[test]
    fn a_clean_report_parses_and_passes() {
        let c = parse(OK, "after failover", Some(118)).expect("parses");
        assert_eq!((c.mem, c.contiguous, c.newer, c.checks), (120, 120, 0, 120));
        assert_eq!(c.daemon, "[{\"name\":\"guestdisk\"}]");
        assert!(problems(&c).is_empty(), "{:?}", problems(&c));
    }

    #[test]
    fn a_disk_behind_ahead_or_short_of_the_client_fails() {
        let behind = "guest: disk mem=50 contiguous=49 newer=0 checks=50 mismatches=1 \
                      first=block_50_is_Empty";
        let c = parse(behind, "x", Some(50)).expect("parses");
        let p = problems(&c).join("; ");
        assert!(
            p.contains("1 of 50") && p.contains("block 50 is Empty"),
            "{p}"
        );
        assert!(p.contains("the client received 50"), "{p}");
        let ahead = "guest: disk mem=50 contiguous=50 newer=1 checks=51 mismatches=1";
        let p = problems(&parse(ahead, "x", None).expect("parses")).join("; ");
        assert!(p.contains("newer than memory"), "{p}");
    }

    #[test]
    fn no_report_or_a_diskless_guest_is_an_error() {
        assert!(parse("guest: disk none mem=3", "x", None).is_err());
        assert!(parse("guest: ", "x", None).is_err());
        assert!(parse("", "x", None).is_err());
        assert!(parse("guest: disk mem=3 contiguous=x", "x", None).is_err());
    }
}
