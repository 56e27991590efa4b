//! `/etc/remus/remus.toml`: the one configuration file of both hosts.
//!
//! Owns: reading and validating the file, locating every error at its line and column,
//! and merging `[defaults]`, `[domain.NAME]` and the built-in defaults into the settings of
//! one domain (command-line flags override them in the callers). Never touches: anything
//! but the text it is given (no Xen, no network, no other file).
//!
//! ```toml
//! [defaults]
//! backup = "backup.example:7788"    # HOST[:PORT] of the backup's `remus backup` (primary)
//! key_file = "/etc/remus/key"
//! interval_ms = 200                 # like `xl remus -i`
//! heartbeat_interval_ms = 200
//! heartbeat_timeout_ms = 1000
//! compress = "lz4"                  # or "none"
//! limit_bytes = 268435456           # held output per vif beyond which frames are dropped
//! cache_pages = 262144              # XOR base of compression, pages per side
//! listen = "0.0.0.0:7788"           # where `remus backup` listens (backup)
//!
//! [domain.web]
//! backup = "10.0.0.2:7789"
//! listen = "0.0.0.0:7789"           # one listener per protected domain on the backup
//!
//! [domain.web.disk.xvda]            # read by disk replication (issue #9)
//! replicate = true
//! ```
//!
//! Unknown keys and sections are errors. Every key is checked on its own, so one run of
//! `remus config check` names every bad key, not only the first.
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

/// Where both hosts read their configuration unless told otherwise.
pub const DEFAULT_PATH: &str = "/etc/remus/remus.toml";
/// The pre-shared key the package creates (postinst) when none exists.
pub const DEFAULT_KEY_FILE: &str = "/etc/remus/key";
/// The backup's port when an address gives none.
pub const DEFAULT_PORT: u16 = 7788;
/// `xl remus`'s own default checkpoint interval.
pub const DEFAULT_INTERVAL_MS: u64 = 200;
/// Longest interval accepted (one hour): anything longer is a typo, not a policy.
pub const MAX_INTERVAL_MS: u64 = 3_600_000;
/// Default address of `remus backup`.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7788";

/// Page-data compression on the wire (the relay's `--compress`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    Lz4,
    None,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Lz4 => "lz4",
            Compression::None => "none",
        }
    }
}

/// The keys of `[defaults]` and of `[domain.NAME]` (the last two only in the latter).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Section {
    /// Primary: the backup's `remus backup` listener, HOST[:PORT].
    pub backup: Option<String>,
    pub key_file: Option<PathBuf>,
    pub interval_ms: Option<u64>,
    pub heartbeat_interval_ms: Option<u64>,
    pub heartbeat_timeout_ms: Option<u64>,
    pub compress: Option<Compression>,
    pub limit_bytes: Option<u64>,
    pub cache_pages: Option<u32>,
    /// Backup: where `remus backup` listens, ADDR:PORT.
    pub listen: Option<String>,
    /// Domain only: protect even though some disks are not replicated (unsafe).
    pub unsafe_unreplicated_disks: Option<bool>,
    /// Domain only: per-disk settings, keyed by the guest's vdev (xvda, …).
    #[serde(default)]
    pub disk: BTreeMap<String, DiskSection>,
}

/// `[domain.NAME.disk.VDEV]`: how one disk is protected. Phase 1 reads only `replicate`
/// (a replicated disk is refused until disk replication lands, issue #9); the other keys
/// are reserved for the disk daemon and validated already so files written now stay valid.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiskSection {
    /// Replicate this disk to the backup (`remus disk`, issue #9). `false` states that the
    /// disk is knowingly left unreplicated (then `unsafe_unreplicated_disks` is needed).
    pub replicate: bool,
    /// Backup: the device or file holding the backup's copy.
    pub backup_target: Option<PathBuf>,
    /// Backup: the port of this disk's stream.
    pub port: Option<u16>,
}

/// One error, located.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// 1-based; 0 when the error has no position (an empty file has none to give).
    pub line: usize,
    pub column: usize,
    pub kind: ProblemKind,
    pub message: String,
}

/// What kind of mistake a problem is (the message says it for people).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    /// Not TOML.
    Syntax,
    /// A table other than [defaults] and [domain.NAME], or `domain` not holding tables.
    Section,
    /// A domain name that cannot be used.
    DomainName,
    /// A domain-only key in [defaults].
    Misplaced,
    /// An unknown key, or a value of the wrong type (serde's verdict).
    Key,
    /// A value of the right type that is out of range or malformed.
    Value,
    /// The merged heartbeat breaks the relay's rule.
    Heartbeat,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{}", render_problems(path, problems))]
    Invalid {
        path: String,
        problems: Vec<Problem>,
    },
}

impl crate::exit::HasExitCode for ConfigError {
    fn exit_code(&self) -> crate::exit::ExitCode {
        // Both are the operator's to fix in the file or on the command line.
        crate::exit::ExitCode::Usage
    }
}

/// `FILE:LINE:COLUMN: message`, one per line (the shape compilers and editors know).
pub fn render_problems(path: &str, problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| {
            if p.line == 0 {
                format!("{path}: {}", p.message)
            } else {
                format!("{path}:{}:{}: {}", p.line, p.column, p.message)
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A parsed, valid configuration.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// The file it came from (None: built-in defaults, no file).
    pub path: Option<PathBuf>,
    pub defaults: Section,
    pub domains: BTreeMap<String, Section>,
}

/// Everything one domain runs with, after `[domain.NAME]` over `[defaults]` over the
/// built-in defaults. Flags are applied by the callers on top.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub backup: Option<String>,
    pub key_file: PathBuf,
    pub interval_ms: u64,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub compress: Compression,
    pub limit_bytes: u64,
    pub cache_pages: u32,
    pub listen: String,
    pub unsafe_unreplicated_disks: bool,
    pub disks: BTreeMap<String, DiskSection>,
}

impl Config {
    /// Reads `path`; with `explicit == false` a missing file means "no file, built-in
    /// defaults" (a fresh install works with flags alone), otherwise it is an error.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, Some(path)).map_err(|problems| ConfigError::Invalid {
                path: p.clone(),
                problems,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(Config {
                path: None,
                ..Default::default()
            }),
            Err(source) => Err(ConfigError::Read { path: p, source }),
        }
    }

    /// Parses and validates; returns every problem found, in file order.
    pub fn parse(text: &str, path: Option<&Path>) -> Result<Config, Vec<Problem>> {
        let lines = LineIndex::new(text);
        let (root, syntax) = DeTable::parse_recoverable(text);
        if !syntax.is_empty() {
            // A recovered document may miss what the broken line said: checking its keys
            // would only add errors that are not real.
            let mut v: Vec<Problem> = syntax
                .iter()
                .map(|e| lines.problem(e.span(), ProblemKind::Syntax, e.message()))
                .collect();
            v.sort_by_key(|p| (p.line, p.column));
            // The parser's recovery often reports a broken line twice; the first says it.
            v.dedup_by_key(|p| p.line);
            return Err(v);
        }
        let mut v = Validator {
            lines: &lines,
            problems: Vec::new(),
        };
        let root = root.into_inner();
        let mut cfg = Config {
            path: path.map(Path::to_path_buf),
            ..Default::default()
        };
        for (k, val) in root.iter() {
            match k.get_ref().as_ref() {
                "defaults" => {
                    if let Some(s) = v.section(val, SectionKind::Defaults) {
                        cfg.defaults = s;
                    }
                }
                "domain" => {
                    let DeValue::Table(t) = val.get_ref() else {
                        v.at(
                            val.span(),
                            ProblemKind::Section,
                            "`domain` must hold tables: write [domain.NAME] sections",
                        );
                        continue;
                    };
                    for (name, sec) in t.iter() {
                        let n = name.get_ref().as_ref();
                        if let Err(why) = check_domain_name(n) {
                            v.at(name.span(), ProblemKind::DomainName, &why);
                            continue;
                        }
                        if let Some(s) = v.section(sec, SectionKind::Domain) {
                            cfg.domains.insert(n.to_string(), s);
                        }
                    }
                }
                other => v.at(
                    k.span(),
                    ProblemKind::Section,
                    &format!("unknown section `{other}` (expected [defaults] or [domain.NAME])"),
                ),
            }
        }
        // Cross-section: each domain's effective heartbeat (its keys over the defaults').
        let names: Vec<String> = std::iter::once(String::new())
            .chain(cfg.domains.keys().cloned())
            .collect();
        for name in names {
            let s = cfg.settings(&name);
            if let Err(why) = check_heartbeat(s.heartbeat_interval, s.heartbeat_timeout) {
                let span = heartbeat_span(&root, &name);
                let what = if name.is_empty() {
                    "[defaults]".to_string()
                } else {
                    format!("[domain.{name}]")
                };
                v.at(span, ProblemKind::Heartbeat, &format!("{what}: {why}"));
            }
        }
        if v.problems.is_empty() {
            Ok(cfg)
        } else {
            v.problems.sort_by_key(|p| (p.line, p.column));
            Err(v.problems)
        }
    }

    /// The merged settings of `domain` (a domain without a section gets `[defaults]`).
    pub fn settings(&self, domain: &str) -> Settings {
        let d = &self.defaults;
        let empty = Section::default();
        let s = self.domains.get(domain).unwrap_or(&empty);
        let ms = |x: Option<u64>, y: Option<u64>, def: Duration| {
            x.or(y).map(Duration::from_millis).unwrap_or(def)
        };
        Settings {
            backup: s.backup.clone().or_else(|| d.backup.clone()),
            key_file: s
                .key_file
                .clone()
                .or_else(|| d.key_file.clone())
                .unwrap_or_else(|| PathBuf::from(DEFAULT_KEY_FILE)),
            interval_ms: s
                .interval_ms
                .or(d.interval_ms)
                .unwrap_or(DEFAULT_INTERVAL_MS),
            heartbeat_interval: ms(
                s.heartbeat_interval_ms,
                d.heartbeat_interval_ms,
                crate::relay::DEFAULT_HEARTBEAT_INTERVAL,
            ),
            heartbeat_timeout: ms(
                s.heartbeat_timeout_ms,
                d.heartbeat_timeout_ms,
                crate::relay::DEFAULT_HEARTBEAT_TIMEOUT,
            ),
            compress: s.compress.or(d.compress).unwrap_or_default(),
            limit_bytes: s
                .limit_bytes
                .or(d.limit_bytes)
                .unwrap_or(crate::netbuf::DEFAULT_LIMIT_BYTES),
            cache_pages: s
                .cache_pages
                .or(d.cache_pages)
                .unwrap_or(crate::relay::DEFAULT_CACHE_PAGES),
            listen: s
                .listen
                .clone()
                .or_else(|| d.listen.clone())
                .unwrap_or_else(|| DEFAULT_LISTEN.to_string()),
            unsafe_unreplicated_disks: s.unsafe_unreplicated_disks.unwrap_or(false),
            disks: s.disk.clone(),
        }
    }

    /// Where the settings came from, for messages ("/etc/remus/remus.toml" or "built-in
    /// defaults (no /etc/remus/remus.toml)").
    pub fn origin(&self) -> String {
        match &self.path {
            Some(p) => p.display().to_string(),
            None => format!("built-in defaults (no {DEFAULT_PATH})"),
        }
    }
}

/// The relay's heartbeat rules (`relay::Heartbeat::new`), worded for the file's keys.
pub fn check_heartbeat(interval: Duration, timeout: Duration) -> Result<(), String> {
    crate::relay::Heartbeat::new(interval, timeout)
        .map(|_| ())
        .map_err(|_| {
            format!(
                "heartbeat_interval_ms = {} and heartbeat_timeout_ms = {}: the timeout must be \
                 at least 100 and at least twice the interval",
                interval.as_millis(),
                timeout.as_millis()
            )
        })
}

/// `HOST[:PORT]` → `host:port` for the relay (IPv6 in brackets: `[fe80::1]:7788`).
pub fn backup_address(s: &str) -> Result<String, String> {
    let t = s.trim();
    let bad = |why: &str| {
        Err(format!(
            "`{s}`: {why} (expected HOST[:PORT], e.g. backup.example or 10.0.0.2:7788 or [fd00::2]:7788)"
        ))
    };
    if t.is_empty() {
        return bad("empty");
    }
    let (host, port) = if let Some(rest) = t.strip_prefix('[') {
        let Some((h, after)) = rest.split_once(']') else {
            return bad("unclosed `[`");
        };
        match after {
            "" => (h, None),
            p if p.starts_with(':') => (h, Some(&p[1..])),
            _ => return bad("unexpected text after `]`"),
        }
    } else if t.matches(':').count() > 1 {
        return bad("an IPv6 address needs brackets");
    } else {
        match t.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (t, None),
        }
    };
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/') {
        return bad("no usable host name");
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return bad("the port must be a number from 1 to 65535"),
        },
    };
    if host.contains(':') {
        Ok(format!("[{host}]:{port}"))
    } else {
        Ok(format!("{host}:{port}"))
    }
}

/// Names usable as a section, a file name under /run/remus and a unit instance.
pub fn check_domain_name(n: &str) -> Result<(), String> {
    if n.is_empty() {
        return Err("a domain name cannot be empty".into());
    }
    if n.chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == '/')
    {
        return Err(format!(
            "domain name `{n}` contains a space, a control character or `/`"
        ));
    }
    if n.ends_with("--incoming") || n.ends_with("--migratedaway") {
        return Err(format!(
            "`{n}` is the temporary name xl gives a domain in transit, not a domain to configure"
        ));
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SectionKind {
    Defaults,
    Domain,
}

struct Validator<'a> {
    lines: &'a LineIndex,
    problems: Vec<Problem>,
}

impl Validator<'_> {
    fn at(&mut self, span: Range<usize>, kind: ProblemKind, msg: &str) {
        self.problems
            .push(self.lines.problem(Some(span), kind, msg));
    }

    /// Checks each key of a section on its own (so every bad key is named), then returns
    /// the section if all were good.
    fn section(&mut self, val: &Spanned<DeValue<'_>>, kind: SectionKind) -> Option<Section> {
        let DeValue::Table(t) = val.get_ref() else {
            self.at(
                val.span(),
                ProblemKind::Section,
                "expected a table (a [section])",
            );
            return None;
        };
        // Each key alone: a bad one is reported and left out, the good ones are kept so
        // the checks across keys (the heartbeat) still see them.
        let mut good = DeTable::new();
        for (k, v) in t.iter() {
            let key = k.get_ref().as_ref();
            if kind == SectionKind::Defaults && matches!(key, "unsafe_unreplicated_disks" | "disk")
            {
                self.at(
                    k.span(),
                    ProblemKind::Misplaced,
                    &format!("`{key}` belongs in a [domain.NAME] section, not in [defaults]"),
                );
                continue;
            }
            let mut one = DeTable::new();
            one.insert(k.clone(), v.clone());
            let de = ValueDeserializer::from(Spanned::new(val.span(), DeValue::Table(one)));
            match Section::deserialize(de) {
                Ok(s) => match check_value(&s) {
                    Ok(()) => {
                        good.insert(k.clone(), v.clone());
                    }
                    Err(why) => self.at(v.span(), ProblemKind::Value, &format!("`{key}`: {why}")),
                },
                Err(e) => {
                    let span = e.span().unwrap_or_else(|| k.span());
                    self.problems.push(self.lines.problem(
                        Some(span),
                        ProblemKind::Key,
                        e.message(),
                    ));
                }
            }
        }
        let de = ValueDeserializer::from(Spanned::new(val.span(), DeValue::Table(good)));
        match Section::deserialize(de) {
            Ok(s) => Some(s),
            Err(e) => {
                let span = e.span().unwrap_or_else(|| val.span());
                self.problems.push(
                    self.lines
                        .problem(Some(span), ProblemKind::Key, e.message()),
                );
                None
            }
        }
    }
}

/// Value checks of a section holding one key (types are serde's job).
fn check_value(s: &Section) -> Result<(), String> {
    if let Some(b) = &s.backup {
        backup_address(b)?;
    }
    if let Some(p) = &s.key_file
        && !p.is_absolute()
    {
        return Err(format!(
            "`{}` is relative: give an absolute path (units run from /)",
            p.display()
        ));
    }
    if let Some(i) = s.interval_ms
        && !(1..=MAX_INTERVAL_MS).contains(&i)
    {
        return Err(format!(
            "{i} is out of range: from 1 to {MAX_INTERVAL_MS} milliseconds"
        ));
    }
    if s.heartbeat_interval_ms == Some(0) {
        return Err("must be at least 1".into());
    }
    if let Some(t) = s.heartbeat_timeout_ms
        && t < crate::relay::MIN_HEARTBEAT_TIMEOUT.as_millis() as u64
    {
        return Err(format!("{t} is below the minimum of 100 milliseconds"));
    }
    if s.limit_bytes == Some(0) {
        return Err("must be more than 0 bytes".into());
    }
    if s.cache_pages == Some(0) {
        return Err("must be at least 1 page".into());
    }
    if let Some(l) = &s.listen
        && l.parse::<std::net::SocketAddr>().is_err()
    {
        return Err(format!(
            "`{l}` is not ADDR:PORT (e.g. 0.0.0.0:7788 or [::]:7788)"
        ));
    }
    for (vdev, d) in &s.disk {
        if d.port == Some(0) {
            return Err(format!("disk {vdev}: port must be from 1 to 65535"));
        }
        if let Some(p) = &d.backup_target
            && !p.is_absolute()
        {
            return Err(format!(
                "disk {vdev}: backup_target `{}` must be an absolute path",
                p.display()
            ));
        }
    }
    Ok(())
}

/// Where to point at a heartbeat problem: the domain's heartbeat key if it sets one, else
/// the defaults', else the section header.
fn heartbeat_span(root: &DeTable<'_>, domain: &str) -> Range<usize> {
    fn entry<'t, 'i>(t: &'t DeTable<'i>, name: &str) -> Option<&'t Spanned<DeValue<'i>>> {
        t.iter()
            .find(|(k, _)| k.get_ref().as_ref() == name)
            .map(|(_, v)| v)
    }
    fn key_span(t: &DeTable<'_>, name: &str) -> Option<Range<usize>> {
        t.iter()
            .find(|(k, _)| k.get_ref().as_ref() == name)
            .map(|(k, _)| k.span())
    }
    fn as_table<'t, 'i>(v: &'t Spanned<DeValue<'i>>) -> Option<&'t DeTable<'i>> {
        match v.get_ref() {
            DeValue::Table(t) => Some(t),
            _ => None,
        }
    }
    let hb = |t: &DeTable<'_>| {
        key_span(t, "heartbeat_interval_ms").or_else(|| key_span(t, "heartbeat_timeout_ms"))
    };
    let defaults = entry(root, "defaults").and_then(as_table);
    let (header, own) = if domain.is_empty() {
        (key_span(root, "defaults"), defaults)
    } else {
        let doms = entry(root, "domain").and_then(as_table);
        (
            doms.and_then(|d| key_span(d, domain)),
            doms.and_then(|d| entry(d, domain)).and_then(as_table),
        )
    };
    own.and_then(hb)
        .or_else(|| defaults.and_then(hb))
        .or(header)
        .unwrap_or(0..0)
}

/// Byte offsets → 1-based line and column (columns count characters).
struct LineIndex {
    starts: Vec<usize>,
    text: String,
}

impl LineIndex {
    fn new(text: &str) -> LineIndex {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex {
            starts,
            text: text.to_string(),
        }
    }

    fn locate(&self, offset: usize) -> (usize, usize) {
        let off = offset.min(self.text.len());
        let line = self.starts.partition_point(|&s| s <= off);
        let start = self.starts[line - 1];
        let col = self
            .text
            .get(start..off)
            .map_or(off - start, |s| s.chars().count())
            + 1;
        (line, col)
    }

    fn problem(&self, span: Option<Range<usize>>, kind: ProblemKind, msg: &str) -> Problem {
        let (line, column) = match span {
            Some(s) if !self.text.is_empty() => self.locate(s.start),
            _ => (0, 0),
        };
        Problem {
            line,
            column,
            kind,
            message: msg.trim().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<(usize, ProblemKind)> {
        match Config::parse(text, None) {
            Ok(_) => Vec::new(),
            Err(v) => v.into_iter().map(|p| (p.line, p.kind)).collect(),
        }
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let text = include_str!("../../packaging/remus.toml");
        let c = Config::parse(text, None).unwrap_or_else(|p| panic!("{p:?}"));
        assert_eq!(c.settings("any"), Config::default().settings("any"));
        // Every example line, uncommented, is valid too, and the [defaults] shown are
        // the built-in ones.
        let on: String = text
            .lines()
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let c = Config::parse(&on, None).unwrap_or_else(|p| panic!("{p:?}"));
        let mut builtin = Config::default().settings("any");
        builtin.backup = Some("backup.example:7788".into());
        assert_eq!(c.settings("any"), builtin);
        assert!(c.settings("web").disks["xvda"].replicate);
    }

    #[test]
    fn domain_keys_override_defaults_and_builtins_fill_the_rest() {
        let c = Config::parse(
            "[defaults]\nbackup = \"b1\"\ninterval_ms = 100\nheartbeat_timeout_ms = 3000\n\
             [domain.web]\nbackup = \"b2:7790\"\nheartbeat_interval_ms = 300\n",
            None,
        )
        .unwrap();
        let web = c.settings("web");
        assert_eq!(web.backup.as_deref(), Some("b2:7790"));
        assert_eq!(web.interval_ms, 100);
        assert_eq!(web.heartbeat_interval, Duration::from_millis(300));
        assert_eq!(web.heartbeat_timeout, Duration::from_secs(3));
        assert_eq!(web.key_file, PathBuf::from(DEFAULT_KEY_FILE));
        let other = c.settings("other");
        assert_eq!(other.backup.as_deref(), Some("b1"));
        assert_eq!(
            other.heartbeat_interval,
            crate::relay::DEFAULT_HEARTBEAT_INTERVAL
        );
        assert_eq!(other.listen, DEFAULT_LISTEN);
        assert!(!other.unsafe_unreplicated_disks);
    }

    #[test]
    fn every_bad_key_is_named_with_its_line() {
        let text = "\
[defaults]
backup = \"b:99999\"
interval = 100
interval_ms = \"fast\"

[domain.web]
compress = \"zstd\"
key_file = \"relative/key\"
listen = \"nowhere\"
";
        use ProblemKind::*;
        assert_eq!(
            problems(text),
            [
                (2, Value),
                (3, Key),
                (4, Key),
                (7, Key),
                (8, Value),
                (9, Value)
            ]
        );
    }

    #[test]
    fn a_syntax_error_names_its_line() {
        let p = problems("[defaults]\nbackup = \"b\"\ninterval_ms = = 3\n");
        assert_eq!(p, [(3, ProblemKind::Syntax)]);
        // Recovery goes on: a second broken line is named too.
        let p = problems("[defaults]\nbackup = \"b\n\ninterval_ms = = 3\n");
        assert_eq!(p, [(2, ProblemKind::Syntax), (4, ProblemKind::Syntax)]);
    }

    #[test]
    fn unknown_sections_and_misplaced_keys_are_errors() {
        let p = problems(
            "[default]\nbackup = \"b\"\n[defaults]\nunsafe_unreplicated_disks = true\n[domain]\nweb = 3\n",
        );
        use ProblemKind::*;
        assert_eq!(p, [(1, Section), (4, Misplaced), (6, Section)]);
    }

    #[test]
    fn a_bad_key_does_not_hide_a_heartbeat_problem_of_the_same_section() {
        let p = problems("[domain.web]\ncompress = \"zstd\"\nheartbeat_interval_ms = 900\n");
        assert_eq!(p, [(2, ProblemKind::Key), (3, ProblemKind::Heartbeat)]);
    }

    #[test]
    fn the_effective_heartbeat_is_checked_per_domain() {
        // Fine alone in [defaults]; the domain's interval breaks it.
        let p = problems(
            "[defaults]\nheartbeat_timeout_ms = 1000\n[domain.web]\nheartbeat_interval_ms = 600\n",
        );
        assert_eq!(p, [(4, ProblemKind::Heartbeat)]);
    }

    #[test]
    fn disk_sections_are_typed() {
        let c = Config::parse(
            "[domain.db.disk.xvda]\nreplicate = true\nport = 7790\n[domain.db.disk.xvdb]\nreplicate = false\n",
            None,
        )
        .unwrap();
        let s = c.settings("db");
        assert!(s.disks["xvda"].replicate);
        assert!(!s.disks["xvdb"].replicate);
        let p = problems("[domain.db.disk.xvda]\nreplicat = true\n");
        assert_eq!(p, [(2, ProblemKind::Key)]);
    }

    #[test]
    fn backup_addresses() {
        assert_eq!(backup_address("b").unwrap(), "b:7788");
        assert_eq!(backup_address("10.0.0.2:7790").unwrap(), "10.0.0.2:7790");
        assert_eq!(backup_address("[fd00::2]").unwrap(), "[fd00::2]:7788");
        assert_eq!(backup_address("[fd00::2]:9").unwrap(), "[fd00::2]:9");
        for bad in ["", "b:0", "b:x", "fd00::2", "[fd00::2", "a b", "b:70000"] {
            assert!(backup_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_missing_default_file_means_builtin_defaults_but_an_explicit_one_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("nope.toml");
        assert!(Config::load(&p, false).unwrap().path.is_none());
        assert!(matches!(
            Config::load(&p, true),
            Err(ConfigError::Read { .. })
        ));
    }

    #[test]
    fn columns_count_characters() {
        let p = problems("[defaults]\n# é\nbackup = 3\n");
        assert_eq!(p, [(3, ProblemKind::Key)]);
        let q = Config::parse("[defaults]\n  é = 1\n", None).unwrap_err();
        assert_eq!((q[0].line, q[0].column), (2, 3), "{q:?}");
    }
}
