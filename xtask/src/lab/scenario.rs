//! The lab's failover scenario (issue 3 step 3), the stream capture, and the report.
//!
//! Owns: the sequence of asserted steps run in dom0 through `vm::exec` (the steps
//! themselves are `lab/dom0/lab.sh` subcommands), the analysis of the client's JSON-lines
//! log, and `target/lab/report.json`. Never touches: the lab's boot (vm.rs) or the cache
//! (build.rs).
//!
//! Two runs share the same steps: `anchor` (stock `xl remus -F -n` over ssh, the
//! comparison: what its client saw is reported, never asserted) and `remus` (the relay:
//! the backup must take over, and the client must see every counter value exactly once,
//! in order, on the same TCP connection).
use super::build::tail_file;
use super::vm::{self, exec, exec_ok};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::Value;
use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// Guest memory (MiB): the smallest the Debian kernel builds a PV domain with here.
pub const GUEST_MEM_MB: u32 = 96;
/// How long the anchor's client is watched after the silent death before the frozen
/// sender is killed (stock Remus has no heartbeat: it is expected not to fail over).
const ANCHOR_BOUND: Duration = Duration::from_secs(60);
/// After the anchor's frozen sender is killed (its socket closes), how long to watch.
const ANCHOR_AFTER_KILL: Duration = Duration::from_secs(60);
/// Bound on the relay's failover (heartbeat timeout + libxl's activation of the backup).
const REMUS_BOUND: Duration = Duration::from_secs(120);
/// How long checkpoints are counted before the death.
const MEASURE: Duration = Duration::from_secs(15);

static RELAY_BUFFER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Replaces the relay's `--vif vifN.0` for this process's runs (diagnostics).
pub fn set_relay_buffer(args: &str) {
    let _ = RELAY_BUFFER.set(args.to_string());
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    Anchor,
    Remus,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Anchor => "anchor",
            Mode::Remus => "remus",
        }
    }
    fn start_arg(self) -> &'static str {
        match self {
            Mode::Anchor => "anchor",
            Mode::Remus => "relay",
        }
    }
}

/// What the client saw, from its log.
#[derive(Serialize, Default, Debug, Clone)]
pub struct Seen {
    pub connections: usize,
    pub local_addr: String,
    pub replies: usize,
    pub replies_after_death: usize,
    pub first_value: Option<u64>,
    pub last_value: Option<u64>,
    /// Replies whose value was not the previous one + 1 but not above it (state went back).
    pub repeats_or_regressions: usize,
    /// Replies that jumped forward by more than one (a request answered twice, lost reply).
    pub gaps: usize,
    /// The first bad transition, as "prev -> value at t".
    pub first_anomaly: Option<String>,
    /// eof / reset / timeout / error / bad_reply / connect_failed, if the client ended so.
    pub terminal_event: Option<String>,
    pub max_reply_gap_s: f64,
    pub first_reply_after_death_s: Option<f64>,
    pub first_good_reply_after_death_s: Option<f64>,
}

#[derive(Serialize, Default, Debug)]
pub struct RunReport {
    pub mode: String,
    pub passed: bool,
    /// The step that failed and why (lab broke, or for remus an assertion failed).
    pub failed_step: Option<String>,
    pub error: Option<String>,
    pub guest_ready_s: Option<f64>,
    pub first_checkpoint_s: Option<f64>,
    pub checkpoints_per_s: Option<f64>,
    pub ms_per_checkpoint: Option<f64>,
    pub checkpoints_before_death: Option<u64>,
    pub backup_took_over: bool,
    /// Anchor only: failover once the frozen sender was killed (its socket closed).
    pub after_kill_first_reply_s: Option<f64>,
    pub verdict: String,
    pub client: Seen,
    /// The client's TCP socket just before it was stopped (`ss -tni`): shows a connection
    /// stuck in retransmission when the backup's TCP state is behind what the client saw.
    pub client_tcp: String,
}

struct Ctx {
    mode: Mode,
    live: bool,
    log: PathBuf,
    t0: Instant,
}

/// Checkpoints started so far, from `xl -vvv`'s log: libxl logs "guest has suspended"
/// once per checkpoint (the first ends the initial live copy). xl's "Checkpointed save"
/// progress lines are rate-limited and undercount.
fn checkpoints() -> u64 {
    let p = vm::share().join("run/sender.log");
    fs::read(&p)
        .map(|b| {
            String::from_utf8_lossy(&b)
                .matches("guest has suspended")
                .count() as u64
        })
        .unwrap_or(0)
}

fn parse_kv(out: &str, key: &str) -> Option<String> {
    out.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")).map(str::to_string))
}

/// Reads the client log: every line, parsed. Missing file = nothing yet.
fn client_events(p: &Path) -> Vec<Value> {
    let Ok(b) = fs::read(p) else { return vec![] };
    String::from_utf8_lossy(&b)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Analyses the client's events; `death` in dom0's clock (Unix seconds).
pub fn analyse(ev: &[Value], death: Option<f64>) -> Seen {
    let mut s = Seen::default();
    let mut prev: Option<(u64, f64)> = None;
    for e in ev {
        let t = e["t"].as_f64().unwrap_or(0.0);
        match e["event"].as_str().unwrap_or("") {
            "connected" => {
                s.connections += 1;
                s.local_addr = e["local"].as_str().unwrap_or("").to_string();
            }
            "reply" => {
                let Some(v) = e["value"].as_u64() else {
                    continue;
                };
                s.replies += 1;
                s.first_value.get_or_insert(v);
                s.last_value = Some(v);
                let after = death.is_some_and(|d| t > d);
                let mut good = true;
                if let Some((pv, pt)) = prev {
                    s.max_reply_gap_s = s.max_reply_gap_s.max(t - pt);
                    if v != pv + 1 {
                        good = false;
                        if v <= pv {
                            s.repeats_or_regressions += 1;
                        } else {
                            s.gaps += 1;
                        }
                        s.first_anomaly
                            .get_or_insert_with(|| format!("{pv} -> {v} at t={t:.3}"));
                    }
                }
                if after {
                    let d = death.unwrap_or(0.0);
                    s.replies_after_death += 1;
                    s.first_reply_after_death_s.get_or_insert(t - d);
                    if good {
                        s.first_good_reply_after_death_s.get_or_insert(t - d);
                    }
                }
                prev = Some((v, t));
            }
            "done" => {}
            other => {
                let detail = e["detail"].as_str().unwrap_or("");
                s.terminal_event = Some(format!("{other} at t={t:.3}: {detail}"));
            }
        }
    }
    s
}

impl Ctx {
    fn say(&self, msg: &str) {
        eprintln!(
            "[lab {} +{:6.1}s] {msg}",
            self.mode.name(),
            self.t0.elapsed().as_secs_f64()
        );
    }

    /// One status line: checkpoints and the client's last reply.
    fn status(&self) -> String {
        let ev = client_events(&self.log);
        let last = ev.iter().rev().find(|e| e["event"] == "reply");
        let c = match last {
            Some(e) => format!(
                "client: request #{} -> counter {} (rtt {:.0} ms)",
                e["seq"],
                e["value"],
                e["rtt_ms"].as_f64().unwrap_or(0.0)
            ),
            None => "client: no reply yet".into(),
        };
        format!("checkpoints {:4} | {c}", checkpoints())
    }

    /// Polls `cond` until true or `bound`; prints the live view (every second when live,
    /// every 10 s otherwise).
    fn wait(
        &self,
        what: &str,
        bound: Duration,
        mut cond: impl FnMut() -> Result<bool>,
    ) -> Result<bool> {
        let t = Instant::now();
        let mut last_print = Instant::now();
        let every = if self.live {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(10)
        };
        loop {
            if cond()? {
                return Ok(true);
            }
            if t.elapsed() > bound {
                return Ok(false);
            }
            if last_print.elapsed() >= every {
                self.say(&format!("{what}… {}", self.status()));
                last_print = Instant::now();
            }
            if vm::qemu_pid().is_none() {
                bail!("QEMU died");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn replies(&self) -> usize {
        client_events(&self.log)
            .iter()
            .filter(|e| e["event"] == "reply")
            .count()
    }

    fn client_terminal(&self) -> Option<String> {
        analyse(&client_events(&self.log), None).terminal_event
    }
}

/// Runs one mode; a lab failure or (remus) an assertion failure is recorded in the
/// report with the step, and the lab is cleaned up either way.
pub fn run(mode: Mode, live: bool) -> RunReport {
    let ctx = Ctx {
        mode,
        live,
        log: vm::share().join(format!("run/client-{}.jsonl", mode.name())),
        t0: Instant::now(),
    };
    let mut r = RunReport {
        mode: mode.name().into(),
        ..Default::default()
    };
    let mut step = String::new();
    let res = steps(&ctx, &mut r, &mut step);
    let _ = exec(
        "sh /share/lab/dom0/lab.sh cleanup",
        Duration::from_secs(120),
    );
    // Keep the run's sender log next to the client's.
    let run = vm::share().join("run");
    for f in ["sender", "receiver"] {
        let _ = fs::rename(
            run.join(format!("{f}.log")),
            run.join(format!("{f}-{}.log", mode.name())),
        );
    }
    match res {
        Ok(()) => r.passed = true,
        Err(e) => {
            r.passed = false;
            r.failed_step = Some(step.clone());
            r.error = Some(format!("{e:#}"));
            ctx.say(&format!("FAILED at step `{step}`: {e:#}"));
            eprintln!("{}", vm::consoles(25));
            for f in ["sender", "receiver"] {
                let p = run.join(format!("{f}-{}.log", mode.name()));
                if p.exists() {
                    eprintln!(
                        "===== {f} log ({}) =====\n{}",
                        p.display(),
                        tail_file(&p, 25)
                    );
                }
            }
        }
    }
    r
}

fn steps(c: &Ctx, r: &mut RunReport, step: &mut String) -> Result<()> {
    let lab = |what: &str, args: &str, secs: u64| {
        exec_ok(
            what,
            &format!("sh /share/lab/dom0/lab.sh {args}"),
            Duration::from_secs(secs),
        )
    };
    let begin = |step: &mut String, s: &str| {
        *step = s.to_string();
        c.say(s);
    };

    begin(step, "cleanup before the run");
    lab("cleanup", "cleanup", 120)?;

    begin(step, "a: the guest boots and its service answers");
    let out = lab("guest up", &format!("guest-up {GUEST_MEM_MB}"), 300)?;
    r.guest_ready_s = parse_kv(&out, "ready_after_s").and_then(|v| v.parse().ok());
    c.say(out.trim());

    begin(
        step,
        "a: the client connects from its own netns across the bridge",
    );
    lab(
        "client start",
        &format!("client-start {}", c.mode.name()),
        60,
    )?;

    begin(step, "b: the client gets replies on its one connection");
    if !c.wait("waiting for 10 replies", Duration::from_secs(60), || {
        Ok(c.replies() >= 10 || c.client_terminal().is_some())
    })? || c.replies() < 10
    {
        bail!(
            "fewer than 10 replies in 60 s: {:?}",
            analyse(&client_events(&c.log), None)
        );
    }

    begin(step, "c: protection starts (xl remus)");
    let env = RELAY_BUFFER
        .get()
        .map(|b| format!("LAB_RELAY_BUFFER='{b}' "))
        .unwrap_or_default();
    let out = exec_ok(
        "remus start",
        &format!(
            "{env}sh /share/lab/dom0/lab.sh remus-start {}",
            c.mode.start_arg()
        ),
        Duration::from_secs(60),
    )?;
    c.say(out.trim());
    let started = Instant::now();

    begin(step, "c: the first checkpoints complete");
    let mut alive_check = Instant::now();
    let ok = c.wait(
        "waiting for the first checkpoint",
        Duration::from_secs(400),
        || {
            if alive_check.elapsed() > Duration::from_secs(5) {
                alive_check = Instant::now();
                if exec(
                    "sh /share/lab/dom0/lab.sh remus-alive",
                    Duration::from_secs(30),
                )?
                .rc != 0
                {
                    bail!(
                        "xl remus exited before its first checkpoint:\n{}",
                        tail_file(&vm::share().join("run/sender.log"), 25)
                    );
                }
            }
            Ok(checkpoints() >= 2)
        },
    )?;
    if !ok {
        bail!("no checkpoint within 400 s of starting xl remus");
    }
    r.first_checkpoint_s = Some(started.elapsed().as_secs_f64());

    begin(
        step,
        "c: checkpoints keep coming and the client keeps getting replies",
    );
    let (n1, t1, rep1) = (checkpoints(), Instant::now(), c.replies());
    c.wait("measuring", MEASURE, || Ok(false))?;
    let (n2, dt, rep2) = (checkpoints(), t1.elapsed().as_secs_f64(), c.replies());
    if n2 <= n1 {
        bail!("no checkpoint in {dt:.0} s after the first ones ({n1} then {n2})");
    }
    if rep2 <= rep1 {
        bail!(
            "the client got no reply while protected ({rep1} replies before, {rep2} after {dt:.0} s)"
        );
    }
    if let Some(t) = c.client_terminal() {
        bail!("the client's connection ended while protected: {t}");
    }
    let rate = (n2 - n1) as f64 / dt;
    r.checkpoints_per_s = Some(rate);
    r.ms_per_checkpoint = Some(1e3 / rate);
    c.say(&format!(
        "{rate:.2} checkpoints/s ({:.0} ms each)",
        1e3 / rate
    ));

    begin(
        step,
        "d: the primary dies silently (sender frozen, primary destroyed)",
    );
    r.checkpoints_before_death = Some(checkpoints());
    let out = lab("freeze primary", "freeze-primary", 60)?;
    c.say(out.trim());
    let death: f64 = parse_kv(&out, "death")
        .and_then(|v| v.parse().ok())
        .context("freeze-primary printed no death time")?;
    let primary: String = parse_kv(&out, "destroyed_domid").unwrap_or_default();

    begin(
        step,
        "e: the backup takes over and the client's connection carries on",
    );
    let bound = if c.mode == Mode::Anchor {
        ANCHOR_BOUND
    } else {
        REMUS_BOUND
    };
    let took_over = c.wait("waiting for a reply from the backup", bound, || {
        let s = analyse(&client_events(&c.log), Some(death));
        Ok(s.replies_after_death > 0 || s.terminal_event.is_some())
    })?;
    let seen = analyse(&client_events(&c.log), Some(death));
    let took_over = took_over && seen.replies_after_death > 0;

    if c.mode == Mode::Anchor {
        if !took_over {
            c.say(&format!(
                "no failover within {} s (stock Remus has no heartbeat); killing the frozen sender",
                ANCHOR_BOUND.as_secs()
            ));
            let out = lab("kill the frozen sender", "unfreeze-kill", 60)?;
            let killed: f64 = parse_kv(&out, "killed")
                .and_then(|v| v.parse().ok())
                .unwrap_or(death);
            c.wait(
                "waiting for a reply after the sender was killed",
                ANCHOR_AFTER_KILL,
                || {
                    let s = analyse(&client_events(&c.log), Some(killed));
                    Ok(s.replies_after_death > 0 || s.terminal_event.is_some())
                },
            )?;
            r.after_kill_first_reply_s =
                analyse(&client_events(&c.log), Some(killed)).first_reply_after_death_s;
        }
        c.wait("letting the client run on", Duration::from_secs(5), || {
            Ok(false)
        })?;
    } else {
        if !took_over {
            r.client_tcp = lab("client tcp", "client-tcp", 30)
                .unwrap_or_default()
                .trim()
                .to_string();
            r.verdict = verdict(c.mode, &seen, r);
            r.client = seen.clone();
            bail!(
                "no reply from the backup within {} s of the primary's death ({}); client TCP: {}",
                REMUS_BOUND.as_secs(),
                seen.terminal_event
                    .clone()
                    .unwrap_or_else(|| "connection still open".into()),
                r.client_tcp
            );
        }
        let base = seen.replies;
        begin(step, "e: the client carries on after the failover");
        c.wait("20 more replies", Duration::from_secs(60), || {
            Ok(c.replies() >= base + 20 || c.client_terminal().is_some())
        })?;
    }

    begin(step, "e: the backup copy is now the guest");
    let backup = exec_ok(
        "backup domain",
        "xl list | awk '$1==\"guest\" {print $2}'",
        Duration::from_secs(30),
    )?;
    let backup = backup.trim().to_string();
    r.backup_took_over = !backup.is_empty() && backup != primary;
    c.say(&format!(
        "primary domid was {primary}, the domain named guest is now {backup:?}"
    ));

    r.client_tcp = lab("client tcp", "client-tcp", 30)
        .unwrap_or_default()
        .trim()
        .to_string();
    lab("client stop", "client-stop", 60)?;
    let seen = analyse(&client_events(&c.log), Some(death));
    r.verdict = verdict(c.mode, &seen, r);
    r.client = seen.clone();
    c.say(&format!("client saw: {}", r.verdict));

    if c.mode == Mode::Remus {
        begin(
            step,
            "e: every counter value exactly once, in order, on one connection",
        );
        let mut bad = vec![];
        if seen.connections != 1 {
            bad.push(format!("{} connections (must be 1)", seen.connections));
        }
        if let Some(t) = &seen.terminal_event {
            bad.push(format!("the connection ended: {t}"));
        }
        if seen.repeats_or_regressions > 0 || seen.gaps > 0 {
            bad.push(format!(
                "{} repeats/regressions and {} gaps, first {}",
                seen.repeats_or_regressions,
                seen.gaps,
                seen.first_anomaly.clone().unwrap_or_default()
            ));
        }
        if seen.replies_after_death < 20 {
            bad.push(format!(
                "only {} replies after the failover",
                seen.replies_after_death
            ));
        }
        if !r.backup_took_over {
            bad.push(format!(
                "the guest is not a new domain (primary {primary}, now {backup:?})"
            ));
        }
        if !bad.is_empty() {
            bail!("{}", bad.join("; "));
        }
    }
    Ok(())
}

fn verdict(mode: Mode, s: &Seen, r: &RunReport) -> String {
    let mut v = vec![];
    match s.first_reply_after_death_s {
        Some(t) => v.push(format!("first reply {t:.1} s after the death")),
        None if mode == Mode::Anchor => {
            v.push(format!("no failover within {} s", ANCHOR_BOUND.as_secs()));
            match r.after_kill_first_reply_s {
                Some(t) => v.push(format!(
                    "after the frozen sender was killed: reply after {t:.1} s"
                )),
                None => v.push("no reply after the sender was killed either".into()),
            }
        }
        None => v.push("no reply after the death".into()),
    }
    if r.backup_took_over
        && s.first_reply_after_death_s.is_none()
        && r.after_kill_first_reply_s.is_none()
    {
        v.push(
            "the backup copy did take over, but the client's connection never answered again, most likely because \
             without output commit the client had acknowledged replies that the backup's older TCP state never sent (see client_tcp)"
                .into(),
        );
    }
    if s.repeats_or_regressions > 0 {
        v.push(format!(
            "{} repeated/regressed counter values (first {})",
            s.repeats_or_regressions,
            s.first_anomaly.clone().unwrap_or_default()
        ));
    }
    if s.gaps > 0 {
        v.push(format!("{} gaps", s.gaps));
    }
    if let Some(t) = &s.terminal_event {
        v.push(format!("connection ended: {t}"));
    }
    if s.repeats_or_regressions == 0
        && s.gaps == 0
        && s.terminal_event.is_none()
        && s.replies_after_death > 0
    {
        v.push("every value once, in order, same connection".into());
    }
    v.join("; ")
}

/// The side-by-side table of the runs.
pub fn table(runs: &[RunReport]) -> String {
    let f = |o: Option<f64>, p: usize| o.map_or("-".to_string(), |v| format!("{v:.p$}"));
    let mut s = format!(
        "{:<8} {:<6} {:>8} {:>8} {:>10} {:>9} {:>8}  {}\n",
        "run",
        "result",
        "ckpt/s",
        "ms/ckpt",
        "failover_s",
        "replies",
        "repeats",
        "what the client saw"
    );
    for r in runs {
        let res = if r.passed { "ok" } else { "FAIL" };
        let fo = r
            .client
            .first_good_reply_after_death_s
            .or(r.client.first_reply_after_death_s);
        s.push_str(&format!(
            "{:<8} {:<6} {:>8} {:>8} {:>10} {:>9} {:>8}  {}\n",
            r.mode,
            res,
            f(r.checkpoints_per_s, 2),
            f(r.ms_per_checkpoint, 0),
            f(fo, 1),
            r.client.replies,
            r.client.repeats_or_regressions,
            if r.verdict.is_empty() {
                r.failed_step.clone().unwrap_or_default()
            } else {
                r.verdict.clone()
            }
        ));
    }
    s
}

/// Where a Remus stream's `n`-th complete checkpoint ends (after its libxl
/// CHECKPOINT_END), and how many complete checkpoints it holds. Minimal, for cutting the
/// fixture: xl header (32-byte magic, 4 u32, optional data), libxl header (16 bytes), then
/// records `u32 type, u32 len, body padded to 8`, tracking the libxl/libxc layers (the
/// libxc image and domain headers, 24 + 16 bytes, come once, first thing in libxc).
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
            (false, 1) => libxc = true,
            (true, 0x0e) | (true, 0) => libxc = false,
            (false, 4) => ends.push(o),
            _ => {}
        }
    }
    ends
}

/// Captures a real Remus stream (stock `xl remus -s ''`, the stream teed to the share),
/// cuts it after `checkpoints_wanted` complete checkpoints after the initial copy, and
/// writes it zstd-compressed, with a README, as the stream parser's fixture.
pub fn capture(checkpoints_wanted: u64) -> Result<PathBuf> {
    let lab = |what: &str, args: &str, secs: u64| {
        exec_ok(
            what,
            &format!("sh /share/lab/dom0/lab.sh {args}"),
            Duration::from_secs(secs),
        )
    };
    lab("cleanup", "cleanup", 120)?;
    lab("guest up", &format!("guest-up {GUEST_MEM_MB}"), 300)?;
    lab("capture start", "remus-start capture", 60)?;
    let t = Instant::now();
    // One more than wanted: the first checkpoint is the initial copy; one more to be sure
    // the last wanted one is complete in the file.
    while checkpoints() < checkpoints_wanted + 2 {
        if t.elapsed() > Duration::from_secs(600) {
            bail!(
                "only {} checkpoints after 600 s:\n{}",
                checkpoints(),
                tail_file(&vm::share().join("run/sender.log"), 20)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    lab("stop sender", "stop-sender", 60)?;
    std::thread::sleep(Duration::from_secs(2));
    let raw = vm::share().join("run/stream.bin");
    let bytes = fs::read(&raw).with_context(|| format!("reading {}", raw.display()))?;
    let info = exec_ok(
        "versions",
        "echo \"Xen $(xl info | sed -n 's/^xen_version *: //p'), dom0 kernel $(uname -r)\"",
        Duration::from_secs(30),
    )
    .unwrap_or_default();
    lab("cleanup", "cleanup", 120)?;
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
    let cut_path = vm::share().join("run/stream-cut.bin");
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
    let readme = format!(
        "# remus-pv-stream.bin.zst\n\n\
         A real Remus migration stream captured in the Xen lab by `cargo xtask lab \
         capture-stream --checkpoints {checkpoints_wanted}`:\n\
         `xl remus -F -n -i 200 -s '' guest \"sh -c 'tee stream.bin | xl migrate-receive -r -e'\"`.\n\n\
         - {}\n\
         - guest: PV, {GUEST_MEM_MB} MiB, 1 vCPU, Debian 6.1 kernel, busybox initramfs running \
         the lab's counter service, `init_on_free=1`; most of the compressed size is the \
         guest kernel's own pages in the initial copy\n\
         - interval: 200 ms (`-i 200`); no network buffer (`-n`)\n\
         - {} complete checkpoints: checkpoint 1 is the initial live copy, then \
         {checkpoints_wanted} more; the file is cut right after the libxl CHECKPOINT_END \
         of the last one (at byte {})\n\
         - {} bytes raw, {z} bytes compressed (`zstd -19 --long=27`; decompress with \
         `zstd -d --long=27`)\n\n\
         Layout: xl header + JSON config, libxl header, then per checkpoint a libxl \
         LIBXC_CONTEXT record (type 1; it repeats at the start of every checkpoint), the \
         libxc records (the first time preceded by the libxc image and domain headers) up \
         to CHECKPOINT (0x0E), and the libxl records up to CHECKPOINT_END (4). Checkpoint record ends (byte offsets): \
         {:?}\n",
        info.trim(),
        want,
        cut.len(),
        cut.len(),
        &ends[..want]
    );
    fs::write(dir.join("README.md"), readme)?;
    eprintln!(
        "[lab] captured {} bytes, cut after {want} checkpoints at {} bytes, {z} bytes \
         compressed: {}",
        bytes.len(),
        cut.len(),
        out.display()
    );
    Ok(out)
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

    fn reply(t: f64, v: u64) -> Value {
        serde_json::json!({"t": t, "event": "reply", "seq": v, "value": v, "rtt_ms": 1.0})
    }

    #[test]
    fn analyse_counts_repeats_gaps_and_failover_time() {
        let mut ev = vec![serde_json::json!({"t": 0.0, "event": "connected", "local": "a:1"})];
        ev.extend([reply(1.0, 5), reply(2.0, 6), reply(3.0, 7)]);
        // death at 3.5; the backup resumed from an older checkpoint: 6 again, then on.
        ev.extend([reply(10.0, 6), reply(11.0, 7), reply(12.0, 9)]);
        let s = analyse(&ev, Some(3.5));
        assert_eq!(s.connections, 1);
        assert_eq!(s.replies, 6);
        assert_eq!(s.replies_after_death, 3);
        assert_eq!(s.repeats_or_regressions, 1);
        assert_eq!(s.gaps, 1);
        assert_eq!(s.first_reply_after_death_s, Some(6.5));
        assert_eq!(s.first_good_reply_after_death_s, Some(7.5));
        assert_eq!(s.first_anomaly.as_deref(), Some("7 -> 6 at t=10.000"));
    }

    #[test]
    fn analyse_clean_failover_and_terminal_event() {
        let mut ev: Vec<Value> = (1..=5).map(|v| reply(v as f64, v)).collect();
        ev.push(serde_json::json!({"t": 9.0, "event": "reset", "seq": 6, "detail": "read: x"}));
        let s = analyse(&ev, Some(4.5));
        assert_eq!(s.repeats_or_regressions + s.gaps, 0);
        assert_eq!(s.first_good_reply_after_death_s, Some(0.5));
        assert!(
            s.terminal_event
                .as_deref()
                .is_some_and(|t| t.starts_with("reset"))
        );
    }
}
