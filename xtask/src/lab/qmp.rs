//! A minimal QMP client: one command at a time over a QEMU control socket.
//!
//! Owns: the QMP handshake (greeting, `qmp_capabilities`) and one `execute` with its
//! answer (asynchronous events in between are skipped). Never touches: which QEMU or what
//! the command means (the callers decide). Hand-written rather than a crate: the lab sends
//! one command (`set_link`), and the QMP crates bring an async runtime along.
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

/// Connects to the QMP socket at `path`, runs `command` with `arguments`, and returns its
/// `return` value; a QMP `error` answer is an error naming the command.
pub fn execute(path: &Path, command: &str, arguments: Value) -> Result<Value> {
    let s = UnixStream::connect(path)
        .with_context(|| format!("connecting to QMP at {}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let greeting = read(&mut r)?;
    if greeting.get("QMP").is_none() {
        bail!("{} is not a QMP socket: {greeting}", path.display());
    }
    call(&mut r, &mut w, "qmp_capabilities", json!({}))
        .with_context(|| format!("QMP handshake at {}", path.display()))?;
    call(&mut r, &mut w, command, arguments)
        .with_context(|| format!("QMP {command} at {}", path.display()))
}

/// Sends one command and waits for its answer, skipping events.
fn call(r: &mut impl BufRead, w: &mut impl Write, cmd: &str, args: Value) -> Result<Value> {
    writeln!(w, "{}", json!({"execute": cmd, "arguments": args}))?;
    loop {
        let v = read(r)?;
        if v.get("event").is_some() {
            continue;
        }
        if let Some(e) = v.get("error") {
            bail!("QEMU answered an error: {e}");
        }
        return Ok(v.get("return").cloned().unwrap_or(Value::Null));
    }
}

fn read(r: &mut impl BufRead) -> Result<Value> {
    let mut line = String::new();
    if r.read_line(&mut line).context("reading from QMP")? == 0 {
        bail!("QMP closed the connection");
    }
    serde_json::from_str(&line)
        .with_context(|| format!("QMP sent something that is not JSON: {line}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake QMP server: greets, answers the handshake after an event, then answers the
    /// command with `answer`; returns the lines it was sent.
    fn fake(answer: &'static str) -> (std::path::PathBuf, std::thread::JoinHandle<Vec<String>>) {
        let dir =
            std::env::temp_dir().join(format!("xtask-qmp-{}-{answer:.8}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("qmp.sock");
        let l = UnixListener::bind(&path).expect("bind");
        let h = std::thread::spawn(move || {
            let (s, _) = l.accept().expect("accept");
            let mut w = s.try_clone().expect("clone");
            let mut r = BufReader::new(s);
            let mut got = vec![];
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            for reply in [
                r#"{"event": "NIC_RX_FILTER_CHANGED"}
{"return": {}}"#,
                answer,
            ] {
                let mut line = String::new();
                r.read_line(&mut line).expect("read");
                got.push(line.trim().to_string());
                writeln!(w, "{reply}").unwrap();
            }
            got
        });
        (path, h)
    }

    #[test]
    fn a_command_is_sent_after_the_handshake_and_its_return_comes_back() {
        let (path, h) = fake(r#"{"return": {"ok": 1}}"#);
        let v = execute(&path, "set_link", json!({"name": "p", "up": false})).expect("runs");
        assert_eq!(v, json!({"ok": 1}));
        let got = h.join().expect("fake");
        assert_eq!(got[0], r#"{"arguments":{},"execute":"qmp_capabilities"}"#);
        assert_eq!(
            got[1],
            r#"{"arguments":{"name":"p","up":false},"execute":"set_link"}"#
        );
    }

    #[test]
    fn an_error_answer_is_an_error() {
        let (path, h) = fake(r#"{"error": {"class": "DeviceNotFound", "desc": "no p"}}"#);
        assert!(execute(&path, "set_link", json!({"name": "p", "up": true})).is_err());
        assert_eq!(h.join().expect("fake").len(), 2);
    }
}
