//! Many compare-and-swap writes (and reads) through `/proc/PID/mem` in a
//! few syscalls: grouped into page spans ([`crate::spans`]), each span read
//! once, every write checked against the bytes it expects, then written
//! once and read back once.

use super::EngineError;
use crate::image::hex;
use crate::plan::{EntryFlip, Write};
use crate::process::{Mem, ProcessError};
use crate::spans::{self, Mismatch, SpanError};

fn span_error(pid: i32, e: SpanError) -> EngineError {
    EngineError::Failed {
        pid,
        what: e.to_string(),
    }
}

/// The bytes of each of `ranges` (address, length), read one span at a
/// time.
pub(super) fn read_many(mem: &Mem, ranges: &[(u64, usize)]) -> Result<Vec<Vec<u8>>, EngineError> {
    let mut out = vec![Vec::new(); ranges.len()];
    for span in spans::spans(ranges, false).map_err(|e| span_error(mem.pid(), e))? {
        let bytes = mem.read(span.start, span.len)?;
        for &i in &span.members {
            out[i] = spans::slice_of(&span, &bytes, ranges[i])
                .unwrap_or_default()
                .to_vec();
        }
    }
    Ok(out)
}

/// A batch that failed: why, and the writes whose new bytes are in place
/// (to undo).
#[derive(Debug)]
pub(super) struct Failed {
    pub error: EngineError,
    pub done: Vec<usize>,
}

/// Every one of `writes` (disjoint), compare-and-swap. Every span is read
/// and checked before the first is written, so a write that does not find
/// its expected bytes fails the batch with nothing written. A span that
/// fails to write (the process exited, a page went away) leaves the writes
/// of the spans before it in place, and those of its own whose new bytes
/// read back (or cannot be read): [`Failed::done`].
pub(super) fn write_many(mem: &Mem, writes: &[Write]) -> Result<(), Box<Failed>> {
    let pid = mem.pid();
    let fail = |error: EngineError| {
        Box::new(Failed {
            error,
            done: Vec::new(),
        })
    };
    let ranges: Vec<(u64, usize)> = writes.iter().map(|w| (w.address, w.expected.len())).collect();
    let spans = spans::spans(&ranges, true).map_err(|e| fail(span_error(pid, e)))?;
    let mut planned = Vec::with_capacity(spans.len());
    for span in &spans {
        let current = mem.read(span.start, span.len).map_err(|e| fail(e.into()))?;
        match spans::splice(span, &current, writes) {
            Ok(new) => planned.push(new),
            Err(Mismatch { write, found }) => {
                let w = &writes[write];
                return Err(fail(
                    ProcessError::Mismatch {
                        pid,
                        addr: w.address,
                        expected: if w.new.len() == w.expected.len() {
                            hex(&w.expected)
                        } else {
                            format!(
                                "{} (to be replaced by {} bytes: a compare-and-swap needs the same length)",
                                hex(&w.expected),
                                w.new.len()
                            )
                        },
                        found: hex(&found),
                    }
                    .into(),
                ));
            }
        }
    }
    let mut done = Vec::new();
    for (span, new) in spans.iter().zip(&planned) {
        let written = mem.write(span.start, new).and_then(|()| {
            let back = mem.read(span.start, span.len)?;
            match back.iter().zip(new).position(|(a, b)| a != b) {
                None => Ok(()),
                Some(at) => Err(ProcessError::WriteNotVisible {
                    pid,
                    addr: span.start + at as u64,
                    len: span.len - at,
                    found: hex(&back[at..]),
                }),
            }
        });
        if let Err(e) = written {
            // Which of this span's writes took: those whose new bytes are
            // there, or that cannot be told (an undo then checks them).
            for &i in &span.members {
                let w = &writes[i];
                match mem.read(w.address, w.new.len()) {
                    Ok(b) if b != w.new => {}
                    _ => done.push(i),
                }
            }
            return Err(Box::new(Failed {
                error: e.into(),
                done,
            }));
        }
        done.extend(&span.members);
    }
    Ok(())
}

/// Undo the writes `done` of `writes` (each compare-and-swap back to its
/// expected bytes, in one batch); failures are logged.
pub(super) fn undo(mem: &Mem, writes: &[Write], done: &[usize]) {
    let inverse: Vec<Write> = done.iter().map(|&i| writes[i].inverse()).collect();
    if let Err(f) = write_many(mem, &inverse) {
        tracing::error!(
            "undoing {} writes failed ({} undone): {}",
            inverse.len(),
            f.done.len(),
            f.error
        );
    }
}

/// Flip the live-safe `flips` with threads running: their `k`-th writes
/// all together ([`write_many`]), then the `k+1`-th, so each entry goes
/// through its proven byte order (one byte changes per entry per batch)
/// and no entry ever sees two of its bytes change in one write. All or
/// none: on failure, every entry is written back, last write first.
pub(super) fn flip_live(mem: &Mem, flips: &[&EntryFlip]) -> Result<(), EngineError> {
    let rounds = flips.iter().map(|f| f.writes.len()).max().unwrap_or(0);
    // (round, writes of that round) done so far.
    let mut done: Vec<Vec<Write>> = Vec::new();
    for k in 0..rounds {
        let round: Vec<Write> = flips.iter().filter_map(|f| f.writes.get(k).cloned()).collect();
        if let Err(f) = write_many(mem, &round) {
            let partial: Vec<Write> = f.done.iter().map(|&i| round[i].clone()).collect();
            done.push(partial);
            for writes in done.iter().rev() {
                undo(mem, writes, &(0..writes.len()).collect::<Vec<_>>());
            }
            return Err(f.error);
        }
        done.push(round);
    }
    Ok(())
}
