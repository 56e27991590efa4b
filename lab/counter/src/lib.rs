//! The Xen lab's test service and client, shared pieces.
//!
//! Owns: the tiny line protocol between `counter-server` (in the guest) and
//! `counter-client` (in dom0, in its own network namespace), and the JSON-lines log format
//! the client writes. Never touches: anything of the product (it is only the lab's load).
//!
//! Protocol: the client sends one line per request; the server answers each with one line,
//! the decimal value of a counter kept in the guest's memory, incremented once per request
//! (first reply is 1). State lives only in guest RAM, so a backup that resumed from an old
//! checkpoint shows up as a repeat or regression of the counter. With a disk, each value
//! is also on the guest's disk before it is answered (`disk`), and `disk?` reports how
//! the disk compares with memory.

use std::fmt::Write as _;

pub mod disk;

/// The port the server listens on in the guest.
pub const PORT: u16 = 7000;

/// Escapes `s` as a JSON string body (quotes and control characters).
pub fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// Parses one reply line of the server: a decimal counter value.
pub fn parse_reply(line: &str) -> Option<u64> {
    line.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_str_escapes_quotes_and_controls() {
        assert_eq!(json_str("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
    }

    #[test]
    fn parse_reply_reads_decimal_and_rejects_junk() {
        assert_eq!(parse_reply("42\n"), Some(42));
        assert_eq!(parse_reply("x"), None);
        assert_eq!(parse_reply(""), None);
    }
}
