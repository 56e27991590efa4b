//! The backup's cut: what reaches the receiver, and when a checkpoint may be acknowledged.
//! One of the four places output commit is enforced (`crate::output_commit`): ACK(N) is
//! produced only after every byte of checkpoint N has been handed out for writing, and a
//! checkpoint reaches the receiver whole or not at all, so the receiver can only ever
//! fail over to a checkpoint the cutter let through.
//!
//! Owns: parsing the reconstructed stream and deciding, byte range by byte range, what
//! the receiver gets; which checkpoints are failover points. Never touches: I/O (pure:
//! bytes and merge notices in, steps out).
//!
//! - Checkpoint 1 (the initial copy) is written straight through up to its first
//!   post-suspend record (libxc cannot use a partial first checkpoint anyway, and the
//!   copy is as big as the guest); from there on it is held like any later checkpoint.
//!   So libxc never sees checkpoint 1's CHECKPOINT record before the cutter has decided.
//!   The parser reports that record once its 4-byte type field has arrived, so all but
//!   the last 3 bytes received can go through until then.
//! - Every checkpoint is kept in memory until its CHECKPOINT_END has arrived, then
//!   written whole and acknowledged, unless the primary said it was **merged** (its cut
//!   was not proven in time, [`Cutter::merged`]): a merged checkpoint is held on, and
//!   written together with the next checkpoint that is not merged, once that one is
//!   complete (libxc applies both in turn); only the later one is acknowledged. A merged
//!   checkpoint is therefore never a failover point: whenever the receiver's stdin is
//!   closed, it has received exactly whole checkpoints ending with one that was not
//!   merged, and libxl fails over from that one.
use std::collections::{BTreeSet, VecDeque};

use bytes::Bytes;

use crate::stream::{Event, Parser, StreamError};

/// Bytes of a record header that can arrive before its type is known (the type is the
/// first 4 bytes): checkpoint 1 streams through all but these.
const TYPE_UNKNOWN_BYTES: u64 = 3;

/// One step for the receiver.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Write these bytes to the receiver's stdin. They are (a slice of) a chunk the
    /// cutter was handed: bytes are never copied here (a checkpoint is held as the
    /// chunks it arrived in, not gathered into one buffer).
    Write(Bytes),
    /// Checkpoint N is wholly written once the preceding writes are: acknowledge it.
    Ack(u64),
    /// Not from the cutter: the session puts it before checkpoint N's writes when disks
    /// are replicated. Every disk must hold epoch N durably before N reaches the receiver.
    Durable(u64),
    /// Not from the cutter: the primary said checkpoint N is merged; the disks are told.
    Merged(u64),
}

/// Puts `Durable(N)` before the writes that precede each `Ack(N)` in `steps` (the
/// session does this when disks are replicated; see `receive::disks`).
pub fn with_durable(steps: &mut Vec<Step>) {
    if !steps.iter().any(|s| matches!(s, Step::Ack(_))) {
        return;
    }
    let mut out = Vec::with_capacity(steps.len() + 2);
    let mut segment = 0;
    for s in steps.drain(..) {
        if let Step::Ack(n) = s {
            out.insert(segment, Step::Durable(n));
            out.push(s);
            segment = out.len();
        } else {
            out.push(s);
        }
    }
    *steps = out;
}

/// A merge notice that cannot be honoured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    /// The checkpoint had ended already: it may have been written as a failover point.
    #[error(
        "the primary said checkpoint {checkpoint} was merged after its end had arrived (last ended: {ended}): it must come before"
    )]
    Late { checkpoint: u64, ended: u64 },
    /// Not the checkpoint in progress (the notice comes right after its CHECKPOINT
    /// record, so every earlier checkpoint has ended).
    #[error(
        "the primary said checkpoint {checkpoint} was merged, but only checkpoint {ended} has ended: not the checkpoint in progress"
    )]
    Early { checkpoint: u64, ended: u64 },
}

/// Decides what reaches the receiver and when (see the module docs). Pure.
#[derive(Debug, Default)]
pub struct Cutter {
    parser: Parser,
    events: Vec<Event>,
    /// Stream offset up to which bytes were handed out for writing.
    written: u64,
    /// Bytes from `written` on, not handed out yet, as they arrived.
    pending: VecDeque<Bytes>,
    pending_len: usize,
    /// Checkpoint 1's first post-suspend record starts here, once seen.
    first_tail_at: Option<u64>,
    /// Last checkpoint handed out whole: the failover point.
    complete: u64,
    /// Last checkpoint whose CHECKPOINT_END arrived (merged ones included).
    ended: u64,
    /// Checkpoints announced merged whose end has not arrived yet.
    merged: BTreeSet<u64>,
    /// Merged checkpoints held back until the next failover point.
    held_merged: Vec<u64>,
    finished: bool,
}

impl Cutter {
    pub fn new() -> Self {
        Cutter::default()
    }

    /// Last checkpoint handed out whole: the one the receiver fails over to.
    pub fn complete(&self) -> u64 {
        self.complete
    }

    /// The stream ended with libxl END (a plain migration) and all of it was handed out.
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// Bytes held back (an incomplete checkpoint, merged checkpoints, checkpoint 1's tail).
    pub fn held(&self) -> usize {
        self.pending_len
    }

    /// Merged checkpoints held back now (complete, waiting for the next failover point).
    pub fn held_merged(&self) -> &[u64] {
        &self.held_merged
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    fn take(&mut self, to: u64, steps: &mut Vec<Step>) {
        if to <= self.written {
            return;
        }
        let mut n = (to - self.written) as usize;
        while n > 0 {
            let Some(mut chunk) = self.pending.pop_front() else {
                break;
            };
            if chunk.len() > n {
                // Part of this chunk stays: split it (shared, not copied).
                self.pending.push_front(chunk.split_off(n));
            }
            n -= chunk.len();
            self.pending_len -= chunk.len();
            steps.push(Step::Write(chunk));
        }
        self.written = to;
    }

    /// The primary says `checkpoint`'s cut was not proven in time: it must not become a
    /// failover point. It comes right after the checkpoint's CHECKPOINT record, so it
    /// names the checkpoint in progress.
    pub fn merged(&mut self, checkpoint: u64) -> Result<(), MergeError> {
        if checkpoint <= self.ended {
            return Err(MergeError::Late {
                checkpoint,
                ended: self.ended,
            });
        }
        if checkpoint > self.ended + 1 {
            return Err(MergeError::Early {
                checkpoint,
                ended: self.ended,
            });
        }
        self.merged.insert(checkpoint);
        Ok(())
    }

    /// The next reconstructed stream bytes; returns what to do, in order.
    pub fn push(&mut self, data: Bytes, steps: &mut Vec<Step>) -> Result<(), StreamError> {
        self.events.clear();
        self.parser.feed(&data, &mut self.events)?;
        self.pending_len += data.len();
        if !data.is_empty() {
            self.pending.push_back(data);
        }
        let events = std::mem::take(&mut self.events);
        for ev in &events {
            self.on_event(ev, steps);
        }
        self.events = events;
        let received = self.written + self.pending_len as u64;
        if self.finished {
            self.take(received, steps);
        } else if self.ended == 0 {
            // Checkpoint 1 streams through up to its first post-suspend record; before
            // that is seen, all but a record header whose type may not be known yet.
            let to = self
                .first_tail_at
                .unwrap_or(received.saturating_sub(TYPE_UNKNOWN_BYTES));
            self.take(to, steps);
        }
        Ok(())
    }

    fn on_event(&mut self, ev: &Event, steps: &mut Vec<Step>) {
        match *ev {
            Event::PostSuspendStart { checkpoint: 1, pos } => {
                self.first_tail_at = Some(pos);
            }
            Event::CheckpointComplete { checkpoint, end } => {
                self.ended = checkpoint;
                if self.merged.remove(&checkpoint) {
                    // A merged checkpoint 1 still streams up to its tail.
                    if let (1, Some(tail)) = (checkpoint, self.first_tail_at) {
                        self.take(tail, steps);
                    }
                    self.held_merged.push(checkpoint);
                } else {
                    self.take(end, steps);
                    self.complete = checkpoint;
                    self.held_merged.clear();
                    steps.push(Step::Ack(checkpoint));
                }
            }
            Event::End { end } => {
                self.take(end, steps);
                self.finished = true;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::writer::{WriterConfig, Written, write};

    /// Feeds `stream` in `chunk`s; at offset `at` (the end of its CHECKPOINT record, where
    /// the primary's notice sits in the stream), says that checkpoint `n` is merged, for
    /// each `(n, at)` in `merged`.
    fn run_merged(
        stream: &[u8],
        chunk: usize,
        merged: &[(u64, u64)],
    ) -> (Vec<u8>, Vec<u64>, Cutter) {
        let mut c = Cutter::new();
        let mut steps = Vec::new();
        let mut out = Vec::new();
        let mut acks = Vec::new();
        let mut pos = 0usize;
        let mut notices = merged.iter().peekable();
        while pos < stream.len() {
            let mut end = (pos + chunk).min(stream.len());
            if let Some(&&(_, at)) = notices.peek() {
                end = end.min(at as usize);
            }
            if end > pos {
                steps.clear();
                c.push(Bytes::copy_from_slice(&stream[pos..end]), &mut steps)
                    .unwrap();
                for s in steps.drain(..) {
                    match s {
                        Step::Write(b) => out.extend_from_slice(&b),
                        Step::Ack(n) => acks.push(n),
                        s @ (Step::Durable(_) | Step::Merged(_)) => {
                            panic!("the cutter never emits {s:?}")
                        }
                    }
                }
                pos = end;
            }
            if let Some(&&(n, at)) = notices.peek()
                && at as usize == pos
            {
                c.merged(n).unwrap();
                notices.next();
            }
        }
        (out, acks, c)
    }

    fn run_cutter(stream: &[u8], chunk: usize) -> (Vec<u8>, Vec<u64>, Cutter) {
        run_merged(stream, chunk, &[])
    }

    fn complete_ends(w: &Written) -> Vec<(u64, u64)> {
        w.events
            .iter()
            .filter_map(|e| match *e {
                Event::CheckpointComplete { checkpoint, end } => Some((checkpoint, end)),
                _ => None,
            })
            .collect()
    }

    /// Where libxc's CHECKPOINT record of `n` ends.
    fn libxc_end(w: &Written, n: u64) -> u64 {
        w.events
            .iter()
            .find_map(|e| match *e {
                Event::LibxcCheckpoint { checkpoint, end } if checkpoint == n => Some(end),
                _ => None,
            })
            .expect("the checkpoint record")
    }

    /// The first post-suspend byte of checkpoint 1.
    fn first_tail(w: &Written) -> u64 {
        w.events
            .iter()
            .find_map(|e| match *e {
                Event::PostSuspendStart { checkpoint: 1, pos } => Some(pos),
                _ => None,
            })
            .expect("checkpoint 1's first post-suspend record")
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
    fn checkpoint_one_streams_through_up_to_its_first_post_suspend_record() {
        let w = write(&WriterConfig::pv(2));
        let (_, end1) = complete_ends(&w)[0];
        let tail = first_tail(&w);
        // Before its tail: everything but the last 3 bytes (a record header whose type
        // is not known yet could start there), whatever the chunks.
        for chunk in [1usize, 7, 4096] {
            for cut in [100, end1 / 2, tail] {
                let (out, acks, c) = run_cutter(&w.bytes[..cut as usize], chunk);
                assert_eq!(out, w.bytes[..cut as usize - 3], "chunk {chunk} cut {cut}");
                assert!(acks.is_empty());
                assert_eq!(c.complete(), 0);
            }
        }
        // Inside the tail (its CHECKPOINT record included): held back from the first
        // post-suspend record on, so libxc has no usable checkpoint 1 yet.
        for cut in [tail + 4, libxc_end(&w, 1), end1 - 1] {
            let (out, acks, _) = run_cutter(&w.bytes[..cut as usize], 512);
            assert_eq!(out, w.bytes[..tail as usize], "cut {cut}");
            assert!(acks.is_empty());
        }
        // Its end: all of checkpoint 1, acknowledged.
        let (out, acks, _) = run_cutter(&w.bytes[..end1 as usize], 512);
        assert_eq!(out, w.bytes[..end1 as usize]);
        assert_eq!(acks, [1]);
    }

    #[test]
    fn a_merged_checkpoint_is_held_and_written_with_the_next_one() {
        let w = write(&WriterConfig::pv(4));
        let ends = complete_ends(&w);
        let (end1, end2, end3) = (ends[0].1, ends[1].1, ends[2].1);
        // Told when the primary knows: at its CHECKPOINT record.
        let notice = [(2, libxc_end(&w, 2))];
        for chunk in [1usize, 700, 1 << 20] {
            // Anywhere from checkpoint 2's end to just before 3's: only checkpoint 1.
            for cut in [end2, (end2 + end3) / 2, end3 - 1] {
                let (out, acks, c) = run_merged(&w.bytes[..cut as usize], chunk, &notice);
                assert_eq!(out, w.bytes[..end1 as usize], "chunk {chunk} cut {cut}");
                assert_eq!(acks, [1]);
                assert_eq!(c.complete(), 1);
                assert_eq!(c.held_merged(), [2]);
            }
            // Checkpoint 3 complete: 2 and 3 go out together, only 3 is acknowledged.
            let (out, acks, c) = run_merged(&w.bytes, chunk, &notice);
            assert_eq!(out, w.bytes, "chunk {chunk}");
            assert_eq!(acks, [1, 3, 4]);
            assert_eq!(c.complete(), 4);
            assert!(c.held_merged().is_empty());
        }
    }

    #[test]
    fn consecutive_merges_wait_for_the_first_proven_checkpoint() {
        let w = write(&WriterConfig::hvm(4));
        let ends = complete_ends(&w);
        let notice = [(2, libxc_end(&w, 2)), (3, libxc_end(&w, 3))];
        let (out, acks, c) = run_merged(&w.bytes[..ends[2].1 as usize + 1], 999, &notice);
        assert_eq!(out, w.bytes[..ends[0].1 as usize]);
        assert_eq!(acks, [1]);
        assert_eq!(c.held_merged(), [2, 3]);
        let (out, acks, _) = run_merged(&w.bytes, 999, &notice);
        assert_eq!(out, w.bytes);
        assert_eq!(acks, [1, 4]);
    }

    #[test]
    fn a_merged_first_checkpoint_is_no_failover_point() {
        let w = write(&WriterConfig::pv(3));
        let ends = complete_ends(&w);
        let tail = first_tail(&w);
        let notice = [(1, libxc_end(&w, 1))];
        // Checkpoint 1 complete, 2 not yet: the receiver has only the part before the
        // tail (libxc cannot resume from it: failover is impossible, as it should be),
        // also when all of checkpoint 1 arrives in one piece.
        for chunk in [4096, 1 << 30] {
            for cut in [ends[0].1, ends[1].1 - 1] {
                let (out, acks, c) = run_merged(&w.bytes[..cut as usize], chunk, &notice);
                assert_eq!(out, w.bytes[..tail as usize], "chunk {chunk} cut {cut}");
                assert!(acks.is_empty());
                assert_eq!(c.complete(), 0);
            }
        }
        let (out, acks, _) = run_merged(&w.bytes, 4096, &notice);
        assert_eq!(out, w.bytes);
        assert_eq!(acks, [2, 3]);
    }

    #[test]
    fn a_merge_notice_must_come_before_the_checkpoints_end() {
        let w = write(&WriterConfig::pv(3));
        let ends = complete_ends(&w);
        let (_, _, mut c) = run_cutter(&w.bytes[..ends[1].1 as usize], 4096);
        assert_eq!(
            c.merged(2),
            Err(MergeError::Late {
                checkpoint: 2,
                ended: 2
            })
        );
        assert_eq!(
            c.merged(4),
            Err(MergeError::Early {
                checkpoint: 4,
                ended: 2
            })
        );
        // Only the checkpoint in progress.
        assert_eq!(c.merged(3), Ok(()));
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
            c.push(Bytes::from_static(&[0xAB; 200]), &mut steps),
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

#[cfg(test)]
mod durable_tests {
    use super::*;

    fn w(b: &'static [u8]) -> Step {
        Step::Write(Bytes::from_static(b))
    }

    #[test]
    fn durable_goes_before_each_checkpoints_writes() {
        let mut steps = vec![
            w(b"a"),
            w(b"b"),
            Step::Ack(3),
            w(b"c"),
            Step::Ack(4),
            w(b"d"),
        ];
        with_durable(&mut steps);
        assert_eq!(
            steps,
            [
                Step::Durable(3),
                w(b"a"),
                w(b"b"),
                Step::Ack(3),
                Step::Durable(4),
                w(b"c"),
                Step::Ack(4),
                w(b"d"),
            ]
        );
        // Without an ACK (checkpoint 1 streaming through, a held checkpoint) nothing waits.
        let mut steps = vec![w(b"x")];
        with_durable(&mut steps);
        assert_eq!(steps, [w(b"x")]);
    }
}
