//! `counter-server`: the lab guest's service. Listens on 0.0.0.0:PORT (or the address in
//! argv[1]); for every line received on any connection it increments one in-memory counter
//! and answers with its new value. One thread per connection; std only, built static.
//!
//! With `--disk DEV` (the guest has a disk, the lab's scenario `disk`), every value N is
//! first checked against the disk (block N-1 holds N-1, block N is empty: the disk is
//! exactly where memory is), then written to block N with O_DIRECT and `fdatasync`ed, and
//! only then answered (`lab_counter::disk`). The line `disk?` is not counted: it is
//! answered with one line, `disk mem=M contiguous=H newer=K checks=C mismatches=X
//! [first=...]`: the counter in memory, the whole-disk scan (blocks 1..=H hold 1..=H,
//! K blocks beyond M are written), and the per-request checks so far. Requests are served
//! one at a time (one lock), so `disk?` never sees a write half done.
//! Never touches: anything but its listening socket, its connections and that disk.
use lab_counter::{PORT, disk::DiskLog};
use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    sync::{Arc, Mutex},
};

#[derive(Default)]
struct State {
    mem: u64,
    disk: Option<DiskLog>,
    checks: u64,
    mismatches: u64,
    first_mismatch: Option<String>,
}

impl State {
    /// The next value, written to the disk first (if any). Err: the reply to give instead.
    fn next(&mut self) -> Result<u64, String> {
        let n = self.mem + 1;
        if let Some(d) = self.disk.as_mut() {
            self.checks += 1;
            match d.check(self.mem) {
                Ok(Ok(())) => {}
                Ok(Err(why)) => {
                    self.mismatches += 1;
                    eprintln!("counter-server: DISK MISMATCH: {why}");
                    self.first_mismatch.get_or_insert(why);
                }
                Err(e) => return Err(format!("ERR disk read: {e}")),
            }
            d.write(n).map_err(|e| format!("ERR disk write: {e}"))?;
        }
        self.mem = n;
        Ok(n)
    }

    fn disk_report(&mut self) -> String {
        let mem = self.mem;
        let Some(d) = self.disk.as_mut() else {
            return format!("disk none mem={mem}");
        };
        match d.scan(mem) {
            Ok(s) => {
                let first = s.first_bad.or_else(|| self.first_mismatch.clone());
                format!(
                    "disk mem={mem} contiguous={} newer={} checks={} mismatches={}{}",
                    s.contiguous,
                    s.newer,
                    self.checks,
                    self.mismatches,
                    first
                        .map(|f| format!(" first={}", f.replace(' ', "_")))
                        .unwrap_or_default()
                )
            }
            Err(e) => format!("ERR disk scan: {e}"),
        }
    }
}

fn serve(s: TcpStream, st: Arc<Mutex<State>>) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let reply = {
            let mut g = st.lock().unwrap_or_else(|p| p.into_inner());
            if line.trim() == "disk?" {
                g.disk_report()
            } else {
                g.next().map_or_else(|e| e, |n| n.to_string())
            }
        };
        w.write_all(format!("{reply}\n").as_bytes())?;
    }
}

fn main() {
    let mut addr = format!("0.0.0.0:{PORT}");
    let mut disk: Option<PathBuf> = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--disk" => match it.next() {
                Some(d) => disk = Some(d.into()),
                None => {
                    eprintln!("counter-server: --disk needs a device");
                    std::process::exit(2);
                }
            },
            _ => addr = a,
        }
    }
    let mut st = State::default();
    if let Some(d) = disk {
        match DiskLog::open(&d, true) {
            Ok(l) => {
                eprintln!(
                    "counter-server: every value goes to {} first (room for {})",
                    d.display(),
                    l.capacity()
                );
                st.disk = Some(l);
            }
            Err(e) => {
                eprintln!("counter-server: cannot open {}: {e}", d.display());
                std::process::exit(1);
            }
        }
    }
    let st = Arc::new(Mutex::new(st));
    let l = match TcpListener::bind(&addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("counter-server: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("counter-server: listening on {addr}");
    for s in l.incoming() {
        match s {
            Ok(s) => {
                let st = st.clone();
                std::thread::spawn(move || {
                    if let Err(e) = serve(s, st) {
                        eprintln!("counter-server: connection: {e}");
                    }
                });
            }
            Err(e) => eprintln!("counter-server: accept: {e}"),
        }
    }
}
