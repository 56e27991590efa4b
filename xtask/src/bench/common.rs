//! What the benchmarks share: the release build, running a helper binary that answers with one line of
//! JSON, and the end of every run (a two-column table on stdout with a footer naming the
//! machine's load, the verdict word of a target, the JSON under target/bench/).
//! Never measures by itself and never judges a run (a MISS is printed, not raised).
use std::ffi::OsStr;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value};

/// Builds `remus` and the given examples in release mode; the target directory.
pub fn build_release(examples: &[&str]) -> Result<PathBuf> {
    let mut c = crate::util::cmd("cargo");
    c.args(["build", "--release", "-p", "remus-user", "--bin", "remus"]);
    for e in examples {
        c.args(["--example", e]);
    }
    crate::util::run(&mut c)?;
    Ok(crate::util::root().join("target"))
}

/// Runs a helper (an example, a built binary) that prints one line of JSON; that JSON.
pub fn run_json<S: AsRef<OsStr> + Debug>(bin: &Path, args: &[S]) -> Result<Value> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} {args:?} failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The word after a value that has a target.
pub fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISS" }
}

/// The 1-minute load average now (the machine is shared: the table says how busy it was).
pub fn load_average() -> f64 {
    let mut load = [0f64; 3];
    // SAFETY: getloadavg writes at most 3 doubles.
    unsafe { libc::getloadavg(load.as_mut_ptr(), 3) };
    load[0]
}

/// A two-column table: `title` over the names, `column` over the values.
pub struct Table<'a> {
    pub title: &'a str,
    pub column: &'a str,
    /// Width of the name column and of the value column.
    pub widths: (usize, usize),
}

impl Table<'_> {
    /// Prints a blank line, the header, a rule, one line a row, then `footer`.
    pub fn print(&self, rows: &[(String, String)], footer: &str) {
        let (k, v) = self.widths;
        println!();
        println!("{:<k$} {:>v$}", self.title, self.column);
        println!("{}", "-".repeat(k + v + 1));
        for (name, value) in rows {
            println!("{name:<k$} {value:>v$}");
        }
        println!("{footer}");
    }
}

/// Writes `out` as target/bench/NAME.json (pretty) and says where.
pub fn write_json(target: &Path, name: &str, out: Map<String, Value>) -> Result<PathBuf> {
    let path = target.join("bench").join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&Value::Object(out))?)?;
    println!("wrote {}", path.display());
    Ok(path)
}
