//! The stop signals a long-running command ends on (SIGINT, SIGTERM): one future that
//! names the one that came. Owns no handler state beyond tokio's; never sends a signal.

/// SIGINT or SIGTERM, whichever comes first. Where SIGTERM cannot be watched, SIGINT alone.
pub async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}
