//! `counter-client`: the lab's client. Keeps ONE TCP connection to the guest's counter
//! service, sends a request at a fixed pace and logs every reply as a JSON line with a
//! timestamp. It never reconnects: a reset, EOF or timeout is logged as such and ends the
//! run, because the point is to see whether the same connection survives a failover. The
//! read timeout is long (default 300 s) so a failover pause does not end it. Never
//! touches: anything but its one connection, its log file and the stop file.
//!
//! Log lines (one JSON object each, `t` = Unix seconds, float):
//!   {"t":…,"event":"connected","local":"ip:port","peer":"ip:port"}
//!   {"t":…,"event":"reply","seq":N,"value":V,"rtt_ms":…}
//!   {"t":…,"event":"eof"|"reset"|"timeout"|"error"|"bad_reply","seq":N,"detail":"…"}
//!   {"t":…,"event":"done","seq":N}            (duration elapsed or stop file present)
use lab_counter::{json_str, parse_reply};
use std::{
    fs::OpenOptions,
    io::{BufRead, BufReader, ErrorKind, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

struct Args {
    connect: SocketAddr,
    interval: Duration,
    timeout: Duration,
    duration: Option<Duration>,
    stop_file: Option<PathBuf>,
    log: Option<PathBuf>,
}

const USAGE: &str = "usage: counter-client --connect IP:PORT [--interval-ms 100] \
[--timeout-s 300] [--duration-s N] [--stop-file PATH] [--log PATH]";

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        connect: "169.254.0.2:7000".parse().map_err(|e| format!("{e}"))?,
        interval: Duration::from_millis(100),
        timeout: Duration::from_secs(300),
        duration: None,
        stop_file: None,
        log: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or_else(|| format!("{k} needs a value"));
        let num = |s: String| s.parse::<u64>().map_err(|e| format!("{k}: {e}"));
        match k.as_str() {
            "--connect" => a.connect = v()?.parse().map_err(|e| format!("--connect: {e}"))?,
            "--interval-ms" => a.interval = Duration::from_millis(num(v()?)?),
            "--timeout-s" => a.timeout = Duration::from_secs(num(v()?)?),
            "--duration-s" => a.duration = Some(Duration::from_secs(num(v()?)?)),
            "--stop-file" => a.stop_file = Some(PathBuf::from(v()?)),
            "--log" => a.log = Some(PathBuf::from(v()?)),
            "-h" | "--help" => return Err(USAGE.to_string()),
            _ => return Err(format!("unknown argument {k}\n{USAGE}")),
        }
    }
    Ok(a)
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

struct Log(Box<dyn Write>);

impl Log {
    fn line(&mut self, body: &str) {
        // Flush every line: the host reads the log while the run goes on.
        let _ = writeln!(self.0, "{{\"t\":{:.6},{body}}}", now());
        let _ = self.0.flush();
    }
    fn event(&mut self, ev: &str, seq: u64, detail: &str) {
        self.line(&format!(
            "\"event\":\"{ev}\",\"seq\":{seq},\"detail\":{}",
            json_str(detail)
        ));
    }
}

fn classify(e: &std::io::Error) -> &'static str {
    match e.kind() {
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
            "reset"
        }
        ErrorKind::WouldBlock | ErrorKind::TimedOut => "timeout",
        _ => "error",
    }
}

fn run(a: Args, log: &mut Log) -> i32 {
    let s = match TcpStream::connect_timeout(&a.connect, Duration::from_secs(10)) {
        Ok(s) => s,
        Err(e) => {
            log.event("connect_failed", 0, &format!("{}: {e}", a.connect));
            return 1;
        }
    };
    let _ = s.set_nodelay(true);
    if let Err(e) = s.set_read_timeout(Some(a.timeout)) {
        log.event("error", 0, &format!("set_read_timeout: {e}"));
        return 1;
    }
    let _ = s.set_write_timeout(Some(a.timeout));
    let local = s.local_addr().map(|x| x.to_string()).unwrap_or_default();
    log.line(&format!(
        "\"event\":\"connected\",\"local\":{},\"peer\":{}",
        json_str(&local),
        json_str(&a.connect.to_string())
    ));
    let mut w = match s.try_clone() {
        Ok(w) => w,
        Err(e) => {
            log.event("error", 0, &format!("clone socket: {e}"));
            return 1;
        }
    };
    let mut r = BufReader::new(s);
    let start = Instant::now();
    let mut next = Instant::now();
    let mut line = String::new();
    for seq in 1u64.. {
        if a.duration.is_some_and(|d| start.elapsed() >= d)
            || a.stop_file.as_ref().is_some_and(|p| p.exists())
        {
            log.event("done", seq - 1, "");
            return 0;
        }
        let sent = Instant::now();
        if let Err(e) = w.write_all(format!("{seq}\n").as_bytes()) {
            log.event(classify(&e), seq, &format!("write: {e}"));
            return 2;
        }
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => {
                log.event("eof", seq, "the server closed the connection");
                return 2;
            }
            Ok(_) => match parse_reply(&line) {
                Some(v) => log.line(&format!(
                    "\"event\":\"reply\",\"seq\":{seq},\"value\":{v},\"rtt_ms\":{:.3}",
                    sent.elapsed().as_secs_f64() * 1e3
                )),
                None => {
                    log.event("bad_reply", seq, line.trim());
                    return 2;
                }
            },
            Err(e) => {
                log.event(classify(&e), seq, &format!("read: {e}"));
                return 2;
            }
        }
        next += a.interval;
        let n = Instant::now();
        if next > n {
            std::thread::sleep(next - n);
        } else {
            next = n;
        }
    }
    0
}

fn main() {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("counter-client: {e}");
            std::process::exit(2);
        }
    };
    let out: Box<dyn Write> = match &a.log {
        Some(p) => match OpenOptions::new().create(true).append(true).open(p) {
            Ok(f) => Box::new(f),
            Err(e) => {
                eprintln!("counter-client: cannot open log {}: {e}", p.display());
                std::process::exit(1);
            }
        },
        None => Box::new(std::io::stdout()),
    };
    let mut log = Log(out);
    std::process::exit(run(a, &mut log));
}
