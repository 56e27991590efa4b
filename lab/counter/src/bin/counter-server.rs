//! `counter-server`: the lab guest's service. Listens on 0.0.0.0:PORT (or the address in
//! argv[1]); for every line received on any connection it increments one in-memory counter
//! and answers with its new value. One thread per connection; std only, built static.
//! Never touches: anything but its listening socket and its connections.
use lab_counter::PORT;
use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    sync::atomic::{AtomicU64, Ordering},
};

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn serve(s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let n = COUNTER.fetch_add(1, Ordering::SeqCst) + 1;
        w.write_all(format!("{n}\n").as_bytes())?;
    }
}

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| format!("0.0.0.0:{PORT}"));
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
                std::thread::spawn(move || {
                    if let Err(e) = serve(s) {
                        eprintln!("counter-server: connection: {e}");
                    }
                });
            }
            Err(e) => eprintln!("counter-server: accept: {e}"),
        }
    }
}
