//! The backup's cut: what reaches the receiver, and when a checkpoint may be acknowledged.
//! One of the four places output commit is enforced (`crate::output_commit`): ACK(N) is
//! produced only after every byte of checkpoint N has been handed out for writing.
//!
//! Owns: parsing the reconstructed stream and deciding, byte range by byte range, what
//! the receiver gets. Never touches: I/O (pure: bytes in, steps out).
//!
//! Checkpoint 1 (the initial copy) is written straight through, since libxc cannot use a
//! partial one anyway; for N >= 2 each checkpoint is kept in memory and written only once
//! its CHECKPOINT_END has arrived, then acknowledged. So whenever the receiver's stdin is
//! closed, it has received exactly whole checkpoints, and libxl fails over from the last
//! one.
use crate::stream::{Event, Parser, StreamError};

/// One step for the receiver.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Write these bytes to the receiver's stdin.
    Write(Vec<u8>),
    /// Checkpoint N is wholly written once the preceding writes are: acknowledge it.
    Ack(u64),
}

/// Decides what reaches the receiver and when (see the module docs). Pure.
#[derive(Debug, Default)]
pub struct Cutter {
    parser: Parser,
    events: Vec<Event>,
    /// Stream offset up to which bytes were handed out for writing.
    written: u64,
    /// Bytes from `written` on, not handed out yet.
    pending: Vec<u8>,
    complete: u64,
    finished: bool,
}

impl Cutter {
    pub fn new() -> Self {
        Cutter::default()
    }

    /// Last checkpoint handed out whole.
    pub fn complete(&self) -> u64 {
        self.complete
    }

    /// The stream ended with libxl END (a plain migration) and all of it was handed out.
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// Bytes held back (an incomplete checkpoint >= 2).
    pub fn held(&self) -> usize {
        self.pending.len()
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    fn take(&mut self, to: u64, steps: &mut Vec<Step>) {
        let n = (to - self.written) as usize;
        if n == 0 {
            return;
        }
        let rest = self.pending.split_off(n);
        steps.push(Step::Write(std::mem::replace(&mut self.pending, rest)));
        self.written = to;
    }

    /// The next reconstructed stream bytes; returns what to do, in order.
    pub fn push(&mut self, data: &[u8], steps: &mut Vec<Step>) -> Result<(), StreamError> {
        self.events.clear();
        self.parser.feed(data, &mut self.events)?;
        self.pending.extend_from_slice(data);
        let events = std::mem::take(&mut self.events);
        for ev in &events {
            match *ev {
                Event::CheckpointComplete { checkpoint, end } => {
                    self.take(end, steps);
                    self.complete = checkpoint;
                    steps.push(Step::Ack(checkpoint));
                }
                Event::End { end } => {
                    self.take(end, steps);
                    self.finished = true;
                }
                _ => {}
            }
        }
        self.events = events;
        // Checkpoint 1 (and a plain migration) goes straight through.
        if self.complete == 0 || self.finished {
            let to = self.written + self.pending.len() as u64;
            self.take(to, steps);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::writer::{WriterConfig, write};

    fn run_cutter(stream: &[u8], chunk: usize) -> (Vec<u8>, Vec<u64>, Cutter) {
        let mut c = Cutter::new();
        let mut steps = Vec::new();
        let mut out = Vec::new();
        let mut acks = Vec::new();
        for piece in stream.chunks(chunk) {
            steps.clear();
            c.push(piece, &mut steps).unwrap();
            for s in steps.drain(..) {
                match s {
                    Step::Write(b) => out.extend_from_slice(&b),
                    Step::Ack(n) => {
                        acks.push(n);
                    }
                }
            }
        }
        (out, acks, c)
    }

    fn complete_ends(w: &crate::stream::writer::Written) -> Vec<(u64, u64)> {
        w.events
            .iter()
            .filter_map(|e| match *e {
                Event::CheckpointComplete { checkpoint, end } => Some((checkpoint, end)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn whole_stream_passes_byte_identical_with_an_ack_per_checkpoint() {
        // PV; HVM, whose checkpoints end in the device model's records; PVH.
        for w in [
            write(&WriterConfig::pv(4)),
            write(&WriterConfig::hvm(4)),
            write(&WriterConfig::pvh(4)),
        ] {
            for chunk in [1usize, 7, 4096, 1 << 20] {
                let (out, acks, c) = run_cutter(&w.bytes, chunk);
                assert_eq!(out, w.bytes, "chunk {chunk}");
                assert_eq!(acks, vec![1, 2, 3, 4]);
                assert_eq!(c.complete(), 4);
                assert_eq!(c.held(), 0);
            }
        }
    }

    #[test]
    fn an_hvm_checkpoint_cut_inside_its_device_model_records_is_held_back() {
        use crate::stream::{Layer, libxl_type};
        let w = write(&WriterConfig::hvm(3));
        let (_, end2) = complete_ends(&w)[1];
        // The EMULATOR_CONTEXT record of checkpoint 3: written after the guest resumed,
        // still part of checkpoint 3.
        let emu3 = w
            .events
            .iter()
            .filter_map(|e| match *e {
                Event::Record {
                    layer: Layer::Libxl,
                    rtype: libxl_type::EMULATOR_CONTEXT,
                    start,
                    ..
                } => Some(start),
                _ => None,
            })
            .nth(2)
            .expect("three EMULATOR_CONTEXT records");
        let (out, acks, _) = run_cutter(&w.bytes[..(emu3 + 20) as usize], 512);
        assert_eq!(out, w.bytes[..end2 as usize]);
        assert_eq!(acks, vec![1, 2]);
    }

    #[test]
    fn a_truncated_stream_is_cut_at_the_last_complete_checkpoint() {
        let w = write(&WriterConfig::hvm(3));
        let ends = complete_ends(&w);
        let (_, end2) = ends[1];
        let (_, end3) = ends[2];
        // Cut anywhere inside checkpoint 3: exactly checkpoints 1 and 2 come out.
        for cut in [end2 + 1, (end2 + end3) / 2, end3 - 1] {
            let (out, acks, c) = run_cutter(&w.bytes[..cut as usize], 1000);
            assert_eq!(out.len() as u64, end2, "cut {cut}");
            assert_eq!(out, w.bytes[..end2 as usize]);
            assert_eq!(acks, vec![1, 2]);
            assert_eq!(c.held() as u64, cut - end2);
        }
    }

    #[test]
    fn checkpoint_one_streams_through_before_it_completes() {
        let w = write(&WriterConfig::pv(2));
        let (_, end1) = complete_ends(&w)[0];
        let half = (end1 / 2) as usize;
        let (out, acks, _) = run_cutter(&w.bytes[..half], 4096);
        assert_eq!(out, w.bytes[..half]);
        assert!(acks.is_empty());
    }

    #[test]
    fn plain_migration_is_written_whole() {
        let mut cfg = WriterConfig::pv(1);
        cfg.plain = true;
        let w = write(&cfg);
        let (out, acks, c) = run_cutter(&w.bytes, 3000);
        assert_eq!(out, w.bytes);
        assert!(acks.is_empty());
        assert!(c.finished());
    }

    #[test]
    fn garbage_is_an_error() {
        let mut c = Cutter::new();
        let mut steps = Vec::new();
        assert_eq!(
            c.push(&[0xAB; 200], &mut steps),
            Err(StreamError::BadField {
                pos: 0,
                field: crate::stream::Field::XlMagic,
                found: 0xAB
            })
        );
        assert!(
            steps.is_empty(),
            "nothing of a bad stream reaches the receiver"
        );
    }
}
