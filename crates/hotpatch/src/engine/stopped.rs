//! Writing bytes that threads may be running — a detour's 5-byte jump, or
//! the entry of a prepared function whose byte-by-byte flip is not proven
//! safe — only with every thread stopped, and only when no thread can ever
//! resume inside the bytes being overwritten (DESIGN.md §2, §3).
//!
//! A thread whose `rip` is inside is single-stepped out while the others
//! stay stopped. One that holds an address inside on its stack (a return
//! address, an interrupted context in a signal frame) cannot be stepped
//! out; then every thread runs on for a moment and the tool tries again,
//! a bounded number of times, before giving up with the thread named.

use super::EngineError;
use crate::plan::Write;
use crate::process::{AllStopped, MapEntry, Mem, ProcessError};
use std::time::{Duration, Instant};

/// How much of each thread's stack, above its `rsp`, is searched for a
/// return address or a saved signal context pointing into the bytes.
pub const STACK_SCAN: u64 = 256 * 1024;
/// Attempts before giving up on a thread that stays inside.
pub const ATTEMPTS: usize = 100;
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

pub use crate::plan::Overwrite;

/// Overwritten ranges, sorted, for a lookup per stack word that does not
/// grow with the number of functions a patch detours.
#[derive(Debug, Clone)]
pub struct Ranges {
    sorted: Vec<Overwrite>,
}

impl Ranges {
    pub fn new(ranges: &[Overwrite]) -> Ranges {
        let mut sorted = ranges.to_vec();
        sorted.sort_by_key(|r| r.start);
        Ranges { sorted }
    }

    /// Whether `address` is strictly inside one of the ranges.
    pub fn contains(&self, address: u64) -> bool {
        // Ranges never overlap (each covers its own function's bytes): only
        // the last one starting below `address` can hold it.
        let i = self.sorted.partition_point(|r| r.start < address);
        i > 0 && self.sorted[i - 1].contains(address)
    }
}

/// Where a thread would resume inside an overwritten range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inside {
    pub tid: i32,
    pub address: u64,
    /// "rip", or the stack address holding the value.
    pub found_at: Option<u64>,
}

/// Search the stack words from `rsp` up (at most [`STACK_SCAN`] bytes, not
/// past the mapping holding `rsp`) for a value inside one of `ranges`: a
/// return address, or an interrupted context saved by a signal.
pub fn scan_stack(
    mem: &Mem,
    maps: &[MapEntry],
    rsp: u64,
    ranges: &Ranges,
) -> Result<Option<(u64, u64)>, ProcessError> {
    let Some(stack) = maps.iter().find(|m| rsp >= m.start && rsp < m.end) else {
        return Ok(None);
    };
    let start = rsp & !7;
    let end = stack.end.min(start.saturating_add(STACK_SCAN));
    let bytes = mem.read(start, (end - start) as usize)?;
    Ok(bytes.chunks_exact(8).enumerate().find_map(|(i, w)| {
        let value = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
        ranges.contains(value).then_some((start + 8 * i as u64, value))
    }))
}

/// The first thread that could resume inside one of `ranges`.
pub fn find_inside(
    stopped: &AllStopped,
    mem: &Mem,
    maps: &[MapEntry],
    ranges: &Ranges,
) -> Result<Option<Inside>, ProcessError> {
    for (tid, regs) in stopped.registers()? {
        if ranges.contains(regs.rip) {
            return Ok(Some(Inside {
                tid,
                address: regs.rip,
                found_at: None,
            }));
        }
        if let Some((at, value)) = scan_stack(mem, maps, regs.rsp, ranges)? {
            return Ok(Some(Inside {
                tid,
                address: value,
                found_at: Some(at),
            }));
        }
        // A thread running a remote call or a program (of this tool or
        // another) shows the stub's registers: where it will return to is
        // saved in the call region's frame.
        if let Some((rip, rsp)) = crate::process::remote::saved_context(mem, maps, regs.rsp) {
            if ranges.contains(rip) {
                return Ok(Some(Inside {
                    tid,
                    address: rip,
                    found_at: Some(rsp.wrapping_sub(stub_ret_drop())),
                }));
            }
            if let Some((at, value)) = scan_stack(mem, maps, rsp, ranges)? {
                return Ok(Some(Inside {
                    tid,
                    address: value,
                    found_at: Some(at),
                }));
            }
        }
    }
    Ok(None)
}

/// How far below a borrowed thread's own `rsp` the stub keeps its resume
/// `rip` (the red zone, then the slot).
fn stub_ret_drop() -> u64 {
    crate::process::stub::RED_ZONE + 8
}

/// Do `writes` in order, compare-and-swap; if one finds other bytes than
/// it expects, undo the ones done before it (in reverse) and fail.
pub(super) fn write_all_or_none(mem: &Mem, writes: &[Write]) -> Result<(), ProcessError> {
    for (i, w) in writes.iter().enumerate() {
        if let Err(e) = mem.write_expecting(w.address, &w.expected, &w.new) {
            for done in writes[..i].iter().rev() {
                let inv = done.inverse();
                if let Err(u) = mem.write_expecting(inv.address, &inv.expected, &inv.new) {
                    tracing::error!("undoing the write at {:#x} failed: {u}", inv.address);
                }
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Single steps per stop for threads whose rip is inside a range.
pub const STEPS: usize = 64;
const STEP_TIMEOUT: Duration = Duration::from_millis(20);

/// [`find_inside`], first stepping each thread whose rip is inside a range
/// out of it, one instruction at a time with every other thread stopped
/// (no branch leads back in: the analysis refuses functions where one
/// would). What remains inside after [`STEPS`] steps, a step that blocks,
/// or a return address or signal context on a stack, is for the caller
/// to wait out.
fn step_out(
    stopped: &mut AllStopped,
    mem: &Mem,
    maps: &[MapEntry],
    ranges: &Ranges,
) -> Result<Option<Inside>, ProcessError> {
    let mut steps = 0;
    loop {
        match find_inside(stopped, mem, maps, ranges)? {
            Some(Inside {
                tid, found_at: None, ..
            }) if steps < STEPS => {
                steps += 1;
                if let Err(e) = stopped.step(tid, STEP_TIMEOUT) {
                    tracing::debug!(tid, "stepping out of the overwritten bytes: {e}");
                    return find_inside(stopped, mem, maps, ranges);
                }
            }
            other => {
                if steps > 0 {
                    tracing::debug!(steps, "threads stepped out of the overwritten bytes");
                }
                return Ok(other);
            }
        }
    }
}

/// Write `writes` (multi-byte jumps over `ranges`) with every thread of
/// `pid` stopped and none able to resume inside a range; between attempts
/// the threads run for a moment. Either every write is done or none is.
/// Returns how long the final stop lasted.
pub fn write_stopped(
    pid: i32,
    mem: &Mem,
    maps: &[MapEntry],
    writes: &[Write],
    ranges: &[Overwrite],
) -> Result<Duration, EngineError> {
    // Real-time priority for the stops, when allowed: the target's threads
    // are stopped sooner and resumed sooner. (Apply and revert hold it
    // already; this is for other callers.)
    let _boost = crate::process::Boost::realtime();
    let ranges = &Ranges::new(ranges);
    let mut last = None;
    for attempt in 0..ATTEMPTS {
        let mut stopped = AllStopped::stop(pid, STOP_TIMEOUT)?;
        let began = Instant::now();
        match step_out(&mut stopped, mem, maps, ranges)? {
            Some(inside) => {
                last = Some(inside);
                drop(stopped);
                std::thread::sleep(Duration::from_micros(100 << attempt.min(6)));
            }
            None => {
                // Still stopped: a write that finds other bytes than the
                // plan expects undoes the ones before it.
                write_all_or_none(mem, writes)?;
                let took = stopped.took + began.elapsed();
                drop(stopped);
                return Ok(took);
            }
        }
    }
    let what = match last {
        Some(Inside {
            tid,
            address,
            found_at: None,
        }) => format!("thread {tid} keeps running at {address:#x}, inside the bytes to overwrite"),
        Some(Inside {
            tid,
            address,
            found_at: Some(at),
        }) => format!(
            "thread {tid} holds {address:#x}, inside the bytes to overwrite, on its stack at {at:#x} (a return address or an interrupted signal context)"
        ),
        None => "threads stay inside the bytes to overwrite".to_string(),
    };
    Err(EngineError::Failed {
        pid,
        what: format!("{what}; gave up after {ATTEMPTS} attempts, nothing written"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_lookup_matches_a_linear_search() {
        let list: Vec<Overwrite> = (0..200u64)
            .rev()
            .map(|i| Overwrite {
                start: 0x1000 + i * 37,
                len: 5 + i % 9,
            })
            .collect();
        let ranges = Ranges::new(&list);
        for a in 0xff0..0x1000 + 200 * 37 + 20 {
            assert_eq!(ranges.contains(a), list.iter().any(|r| r.contains(a)), "{a:#x}");
        }
        assert!(!Ranges::new(&[]).contains(0x1000));
    }
}
