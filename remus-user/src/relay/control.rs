//! The control socket of `remus relay send`: the operator's (or `remus protect`'s) way to
//! end protection without a failover, and its answer.
//!
//! Owns: the root-only socket (`/run/remus/relay-send-<vif>.ctl` by default), its one
//! request and the answers (a JSON line each), handing the request to the relay and its
//! answer back, and the client ([`end_protection`]). Never touches: the wire, the buffer,
//! the checkpoint loop: `send::run` does the work and supplies the answer.
//!
//! ```text
//!  client                      relay send                         backup
//!  {"op":"end_protection"} ──► driver: stop reading xl's stream
//!                              DISCARD ─────────────────────────► receiver frozen, killed;
//!                                                                 DOMAIN--incoming destroyed
//!                              ◄──────────────────────────────── DISCARDED{checkpoint}
//!                              release all held, pass traffic
//!  ◄── {"result":"discarded",…}   exit 0: xl resumes the guest here, unprotected
//!      (no DISCARDED within --discard-timeout, or the backup lost meanwhile:
//!  ◄── {"result":"unconfirmed",…} output stays held, exit 5)
//! ```
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{oneshot, watch};

use super::RelayState;

/// What a client may ask.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    /// End protection: the backup discards its copy, then everything held is released
    /// and the relay exits so that xl resumes the guest here.
    EndProtection,
}

/// The answer to `end_protection`, sent once the relay knows how its run ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum EndAnswer {
    /// The backup discarded its copy (its receiver is dead, so nothing can activate it);
    /// everything held was released and the buffer passes traffic. `checkpoint`: the
    /// last one the backup had acknowledged; `copy_destroyed`: its discard command
    /// destroyed the incoming domain (or none had been built yet).
    Discarded {
        checkpoint: u64,
        copy_destroyed: bool,
    },
    /// The backup did not confirm (no answer in time, a refusal, or it was lost
    /// meanwhile): the guest's output stays held (fail closed), the relay exits 5.
    Unconfirmed { reason: String },
    /// The run ended otherwise before the request could be carried out (`state` says
    /// how: the stream ended, the backup was lost, a failure).
    Ended { state: RelayState },
    /// The request line was not understood.
    BadRequest { message: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("creating the control socket {path}: {source}")]
    Bind {
        path: String,
        source: std::io::Error,
    },
    #[error("asking the relay at {path}: {source}")]
    Ask {
        path: String,
        source: std::io::Error,
    },
    #[error("the relay at {path} gave no answer within {timeout:?}")]
    Timeout { path: String, timeout: Duration },
    #[error("the relay at {path} answered something else: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
}

/// A client waiting for the answer: it is sent, then `written` fires once it is out.
type Waiter = oneshot::Sender<(EndAnswer, oneshot::Sender<()>)>;

/// The relay's side of the socket: whether an end was asked for, and who waits to hear
/// how it went. The socket file is removed on drop.
pub struct EndControl {
    requested: watch::Receiver<bool>,
    waiters: Arc<Mutex<Vec<Waiter>>>,
    path: Option<PathBuf>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl EndControl {
    /// No socket: nobody can ask (tests, benchmarks).
    pub fn none() -> EndControl {
        let (_, requested) = watch::channel(false);
        EndControl {
            requested,
            waiters: Arc::default(),
            path: None,
            task: None,
        }
    }

    /// Set once a client asked to end protection (for the checkpoint driver).
    pub fn requested(&self) -> watch::Receiver<bool> {
        self.requested.clone()
    }

    /// Tells every waiting client how the run ended; returns once the answers are
    /// written (or after `bound`), so the process does not exit with them unsent.
    pub async fn answer(&self, answer: EndAnswer, bound: Duration) {
        let waiters: Vec<Waiter> = self
            .waiters
            .lock()
            .map(|mut w| std::mem::take(&mut *w))
            .unwrap_or_default();
        let mut written = Vec::new();
        for w in waiters {
            let (tx, rx) = oneshot::channel();
            if w.send((answer.clone(), tx)).is_ok() {
                written.push(rx);
            }
        }
        let _ = tokio::time::timeout(bound, futures::future::join_all(written)).await;
    }
}

impl Drop for EndControl {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Binds the root-only (0600) control socket at `path` (a stale one of a dead relay is
/// replaced; a live one is not stolen).
pub fn serve(path: &Path) -> Result<EndControl, ControlError> {
    let l = super::status::bind_root_only(path, "--control-socket").map_err(|source| {
        ControlError::Bind {
            path: path.display().to_string(),
            source,
        }
    })?;
    let (tx, requested) = watch::channel(false);
    let waiters: Arc<Mutex<Vec<Waiter>>> = Arc::default();
    let w = waiters.clone();
    let task = tokio::spawn(async move {
        let tx = Arc::new(tx);
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(serve_conn(s, tx.clone(), w.clone()));
        }
    });
    Ok(EndControl {
        requested,
        waiters,
        path: Some(path.to_path_buf()),
        task: Some(task),
    })
}

/// One client: one request line, one answer line.
async fn serve_conn(
    s: tokio::net::UnixStream,
    requested: Arc<watch::Sender<bool>>,
    waiters: Arc<Mutex<Vec<Waiter>>>,
) {
    let (r, mut w) = s.into_split();
    let mut line = String::new();
    if BufReader::new(r).read_line(&mut line).await.is_err() {
        return;
    }
    let answer = match serde_json::from_str::<ControlRequest>(line.trim()) {
        Ok(ControlRequest::EndProtection) => {
            let (tx, rx) = oneshot::channel();
            if let Ok(mut ws) = waiters.lock() {
                ws.push(tx);
            }
            requested.send_replace(true);
            // The relay answers once its run has ended (it outlives this task's wait).
            match rx.await {
                Ok((a, written)) => {
                    let _ = w.write_all(encode(&a).as_bytes()).await;
                    let _ = w.flush().await;
                    let _ = written.send(());
                    return;
                }
                Err(_) => return,
            }
        }
        Err(e) => EndAnswer::BadRequest {
            message: format!("`{}`: {e}", line.trim()),
        },
    };
    let _ = w.write_all(encode(&answer).as_bytes()).await;
}

fn encode<T: Serialize>(v: &T) -> String {
    // Serialising these types cannot fail (no maps, no floats).
    let mut s = serde_json::to_string(v).unwrap_or_default();
    s.push('\n');
    s
}

/// Asks the relay at `path` to end protection and waits up to `timeout` for its answer.
pub async fn end_protection(path: &Path, timeout: Duration) -> Result<EndAnswer, ControlError> {
    let p = path.display().to_string();
    let ask = |source| ControlError::Ask {
        path: p.clone(),
        source,
    };
    let s = tokio::net::UnixStream::connect(path).await.map_err(ask)?;
    let (r, mut w) = s.into_split();
    w.write_all(encode(&ControlRequest::EndProtection).as_bytes())
        .await
        .map_err(ask)?;
    let mut line = String::new();
    let n = tokio::time::timeout(timeout, BufReader::new(r).read_line(&mut line))
        .await
        .map_err(|_| ControlError::Timeout {
            path: p.clone(),
            timeout,
        })?
        .map_err(ask)?;
    if n == 0 {
        return Err(ask(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the relay closed the connection without an answer (it ended meanwhile)",
        )));
    }
    serde_json::from_str(line.trim()).map_err(|source| ControlError::Parse { path: p, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_is_handed_on_and_its_answer_comes_back() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("sub").join("relay.ctl");
        let ctl = serve(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut requested = ctl.requested();
        assert!(!*requested.borrow());
        let p = path.clone();
        let client = tokio::spawn(async move { end_protection(&p, Duration::from_secs(10)).await });
        requested.wait_for(|v| *v).await.unwrap();
        // The waiter registers before the flag is raised.
        let answer = EndAnswer::Discarded {
            checkpoint: 7,
            copy_destroyed: true,
        };
        ctl.answer(answer.clone(), Duration::from_secs(5)).await;
        assert_eq!(client.await.unwrap().unwrap(), answer);
        // A second relay cannot steal a live socket; the file goes with the relay.
        assert!(serve(&path).is_err());
        drop(ctl);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn a_bad_line_is_answered_and_raises_nothing() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("relay.ctl");
        let ctl = serve(&path).unwrap();
        let s = tokio::net::UnixStream::connect(&path).await.unwrap();
        let (r, mut w) = s.into_split();
        w.write_all(b"{\"op\":\"reboot\"}\n").await.unwrap();
        let mut line = String::new();
        BufReader::new(r).read_line(&mut line).await.unwrap();
        assert!(matches!(
            serde_json::from_str::<EndAnswer>(line.trim()).unwrap(),
            EndAnswer::BadRequest { .. }
        ));
        assert!(!*ctl.requested().borrow());
    }

    #[tokio::test]
    async fn the_answers_wire_form_is_tagged() {
        let v = serde_json::to_value(EndAnswer::Ended {
            state: RelayState::BackupLost,
        })
        .unwrap();
        assert_eq!(v["result"], "ended");
        assert_eq!(v["state"], "backup lost, buffer open");
        let v = serde_json::to_value(ControlRequest::EndProtection).unwrap();
        assert_eq!(v, serde_json::json!({"op": "end_protection"}));
    }
}
