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
use crate::process::ptrace::Regs;
use crate::process::remote::CallFrames;
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
    /// Below every range's start / above every range's end: most stack
    /// words are rejected by these two comparisons alone.
    lo: u64,
    hi: u64,
}

impl Ranges {
    pub fn new(ranges: &[Overwrite]) -> Ranges {
        let mut sorted = ranges.to_vec();
        sorted.sort_by_key(|r| r.start);
        let lo = sorted.iter().map(|r| r.start).min().unwrap_or(u64::MAX);
        let hi = sorted
            .iter()
            .map(|r| r.start.saturating_add(r.len))
            .max()
            .unwrap_or(0);
        Ranges { sorted, lo, hi }
    }

    /// Whether `address` is strictly inside one of the ranges.
    pub fn contains(&self, address: u64) -> bool {
        if address <= self.lo || address >= self.hi {
            return false;
        }
        // Ranges never overlap (each covers its own function's bytes): only
        // the last one starting below `address` can hold it.
        let i = self.sorted.partition_point(|r| r.start < address);
        i > 0 && self.sorted[i - 1].contains(address)
    }

    /// The first 8-byte word of `words` (read from `start`) inside one of
    /// the ranges: its address and value.
    pub fn find_word(&self, start: u64, words: &[u8]) -> Option<(u64, u64)> {
        words.chunks_exact(8).enumerate().find_map(|(i, w)| {
            let value = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
            self.contains(value).then_some((start + 8 * i as u64, value))
        })
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

/// The mappings that can hold a stack, sorted, for the extent of each
/// thread's stack scan.
#[derive(Debug)]
pub struct Stacks {
    sorted: Vec<(u64, u64)>,
}

impl Stacks {
    pub fn new(maps: &[MapEntry]) -> Stacks {
        let mut sorted: Vec<(u64, u64)> = maps
            .iter()
            .filter(|m| m.start < m.end)
            .map(|m| (m.start, m.end))
            .collect();
        sorted.sort_unstable();
        Stacks { sorted }
    }

    /// What to search for a thread whose stack pointer is `rsp`: the
    /// stack words from `rsp` up, at most [`STACK_SCAN`] bytes, not past
    /// the mapping holding `rsp`: `(start, length)`. `None` when no
    /// mapping holds `rsp`.
    pub fn extent(&self, rsp: u64) -> Option<(u64, usize)> {
        let i = self.sorted.partition_point(|&(start, _)| start <= rsp);
        let &(map_start, map_end) = self.sorted.get(i.checked_sub(1)?)?;
        if rsp >= map_end {
            return None;
        }
        let start = (rsp & !7).max(map_start);
        let end = map_end.min(start.saturating_add(STACK_SCAN));
        Some((start, (end - start) as usize))
    }
}

/// Read the stack extents `extents` (`None`: nothing to read) in as few
/// system calls as fit [`READ_BATCH`] bytes at a time, calling `each`
/// with the index and the bytes of each, in order; stops at the first
/// `Some` that `each` returns.
fn for_each_stack<T>(
    mem: &Mem,
    extents: &[Option<(u64, usize)>],
    mut each: impl FnMut(usize, &[u8]) -> Result<Option<T>, ProcessError>,
) -> Result<Option<T>, ProcessError> {
    let mut first = 0;
    while first < extents.len() {
        let mut last = first;
        let mut total = 0;
        while last < extents.len()
            && (last == first || total + extents[last].map_or(0, |e| e.1) <= READ_BATCH)
        {
            total += extents[last].map_or(0, |e| e.1);
            last += 1;
        }
        let mut store = vec![0u8; total];
        let mut addrs = Vec::with_capacity(last - first);
        let mut bufs: Vec<&mut [u8]> = Vec::with_capacity(last - first);
        let mut rest = store.as_mut_slice();
        for &(addr, len) in extents[first..last].iter().flatten() {
            let (buf, tail) = rest.split_at_mut(len);
            addrs.push(addr);
            bufs.push(buf);
            rest = tail;
        }
        let mut results = mem.read_many(&addrs, &mut bufs).into_iter();
        drop(bufs);
        let mut at = 0;
        for (i, extent) in extents.iter().enumerate().take(last).skip(first) {
            let bytes: &[u8] = match extent {
                Some((addr, len)) => {
                    match results.next() {
                        Some(read) => read?,
                        None => {
                            return Err(ProcessError::Mem {
                                pid: mem.pid(),
                                op: "read",
                                addr: *addr,
                                len: *len,
                                error: std::io::Error::other("no result for this range"),
                            });
                        }
                    }
                    at += len;
                    &store[at - len..at]
                }
                None => &[],
            };
            if let Some(found) = each(i, bytes)? {
                return Ok(Some(found));
            }
        }
        first = last;
    }
    Ok(None)
}

/// The most stack bytes read in one go.
const READ_BATCH: usize = 8 << 20;

/// Search the stack words from `rsp` up (at most [`STACK_SCAN`] bytes, not
/// past the mapping holding `rsp`) for a value inside one of `ranges`: a
/// return address, or an interrupted context saved by a signal.
pub fn scan_stack(
    mem: &Mem,
    stacks: &Stacks,
    rsp: u64,
    ranges: &Ranges,
) -> Result<Option<(u64, u64)>, ProcessError> {
    let Some((start, len)) = stacks.extent(rsp) else {
        return Ok(None);
    };
    Ok(ranges.find_word(start, &mem.read(start, len)?))
}

/// The first of `threads` (tid, registers) that could resume inside one
/// of `ranges`: its `rip`, a value on its stack (a return address, a
/// signal frame's saved context), or, for a thread running a remote call
/// or program, the context that call saved. The stacks are read in a few
/// batched reads. Every thread must have a mapping in `stacks` or none
/// at all (then its stack is not searched).
fn check_threads(
    mem: &Mem,
    threads: &[(i32, Regs)],
    stacks: &Stacks,
    frames: &CallFrames,
    ranges: &Ranges,
) -> Result<Option<Inside>, ProcessError> {
    let extents: Vec<Option<(u64, usize)>> = threads.iter().map(|(_, r)| stacks.extent(r.rsp)).collect();
    for_each_stack(mem, &extents, |i, bytes| {
        let (tid, regs) = (threads[i].0, &threads[i].1);
        if ranges.contains(regs.rip) {
            return Ok(Some(Inside {
                tid,
                address: regs.rip,
                found_at: None,
            }));
        }
        if let Some((at, value)) = extents[i].and_then(|(start, _)| ranges.find_word(start, bytes)) {
            return Ok(Some(Inside {
                tid,
                address: value,
                found_at: Some(at),
            }));
        }
        // A thread running a remote call or a program (of this tool or
        // another) shows the stub's registers: where it will return to is
        // saved in the call region's frame.
        if let Some((rip, rsp)) = frames.saved_context(mem, regs.rsp) {
            if ranges.contains(rip) {
                return Ok(Some(Inside {
                    tid,
                    address: rip,
                    found_at: Some(rsp.wrapping_sub(stub_ret_drop())),
                }));
            }
            if let Some((at, value)) = scan_stack(mem, stacks, rsp, ranges)? {
                return Ok(Some(Inside {
                    tid,
                    address: value,
                    found_at: Some(at),
                }));
            }
        }
        Ok(None)
    })
}

/// The first thread that could resume inside one of `ranges` (see
/// [`check_threads`]), every thread stopped.
///
/// `maps` may be older than the stop: if a thread's stack pointer is in
/// none of them (a thread created since, a stack that grew), the maps
/// are read again, now that no thread can change them.
pub fn find_inside(
    stopped: &AllStopped,
    mem: &Mem,
    maps: &[MapEntry],
    ranges: &Ranges,
) -> Result<Option<Inside>, ProcessError> {
    let registers = stopped.registers()?;
    let mut stacks = Stacks::new(maps);
    let fresh;
    let mut maps = maps;
    if let Some((tid, regs)) = registers.iter().find(|(_, r)| stacks.extent(r.rsp).is_none()) {
        tracing::debug!(
            tid,
            rsp = regs.rsp,
            "a stack pointer in no mapping known: reading the maps again"
        );
        fresh = crate::process::Process::open(stopped.pid())?.maps()?;
        maps = &fresh;
        stacks = Stacks::new(maps);
    }
    check_threads(mem, &registers, &stacks, &CallFrames::new(maps), ranges)
}

/// [`find_inside`] done thread by thread while the stop is under way: each
/// thread is checked as soon as it is stopped, in the time otherwise spent
/// waiting for the others.
///
/// This sees what a check after the stop would see: what the search looks
/// for (`rip`, a return address the thread's own `call` pushed, a signal
/// frame the kernel builds when the thread itself takes a signal, the
/// context a remote call saved) changes only while that thread runs, or
/// through a tool's ptrace or memory writes, never while it is stopped.
/// A thread whose stack is in none of the given maps makes the result
/// unknown ([`Watch::result`] is `None`): the caller then runs
/// [`find_inside`] once every thread is stopped.
pub struct Watch<'a> {
    mem: &'a Mem,
    ranges: &'a Ranges,
    stacks: Stacks,
    frames: CallFrames,
    found: Option<Inside>,
    unknown: bool,
}

impl<'a> Watch<'a> {
    pub fn new(mem: &'a Mem, maps: &[MapEntry], ranges: &'a Ranges) -> Watch<'a> {
        Watch {
            mem,
            ranges,
            stacks: Stacks::new(maps),
            frames: CallFrames::new(maps),
            found: None,
            unknown: false,
        }
    }

    /// Check threads that just stopped.
    pub fn check(&mut self, threads: &[(i32, Regs)]) -> Result<(), ProcessError> {
        if self.found.is_some() || self.unknown {
            return Ok(());
        }
        if threads.iter().any(|(_, r)| self.stacks.extent(r.rsp).is_none()) {
            self.unknown = true;
            return Ok(());
        }
        self.found = check_threads(self.mem, threads, &self.stacks, &self.frames, self.ranges)?;
        Ok(())
    }

    /// The first thread found inside (`Some(None)`: none), or `None` if
    /// the threads seen could not all be checked.
    pub fn result(self) -> Option<Option<Inside>> {
        (!self.unknown || self.found.is_some()).then_some(self.found)
    }
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
    first: Option<Inside>,
) -> Result<Option<Inside>, ProcessError> {
    let mut steps = 0;
    let mut inside = first;
    loop {
        match inside {
            Some(Inside {
                tid, found_at: None, ..
            }) if steps < STEPS => {
                steps += 1;
                if let Err(e) = stopped.step(tid, STEP_TIMEOUT) {
                    tracing::debug!(tid, "stepping out of the overwritten bytes: {e}");
                    return find_inside(stopped, mem, maps, ranges);
                }
                inside = find_inside(stopped, mem, maps, ranges)?;
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
        // Each thread is checked as it stops, while the others stop.
        let mut watch = Watch::new(mem, maps, ranges);
        let mut stopped = AllStopped::stop_watching(pid, STOP_TIMEOUT, &mut |threads| watch.check(threads))?;
        let began = Instant::now();
        let first = match watch.result() {
            Some(first) => first,
            None => find_inside(&stopped, mem, maps, ranges)?,
        };
        match step_out(&mut stopped, mem, maps, ranges, first)? {
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

    #[test]
    fn finds_the_first_word_inside() {
        let ranges = Ranges::new(&[
            Overwrite {
                start: 0x5000,
                len: 8,
            },
            Overwrite {
                start: 0x1000,
                len: 5,
            },
        ]);
        let words: Vec<u8> = [0x1000u64, 0x5008, 0x4fff, 0x1003, 0x5001]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        assert_eq!(ranges.find_word(0x7000, &words), Some((0x7018, 0x1003)));
        assert_eq!(ranges.find_word(0x7000, &words[..24]), None);
        // A trailing partial word is not a word.
        assert_eq!(ranges.find_word(0x7000, &words[..31]), None);
    }

    fn map(start: u64, end: u64) -> MapEntry {
        MapEntry {
            start,
            end,
            readable: true,
            writable: true,
            executable: false,
            private: true,
            offset: 0,
            inode: 0,
            path: None,
            deleted: false,
        }
    }

    #[test]
    fn a_stack_extent_ends_at_its_mapping_or_the_scan_limit() {
        let maps = [
            map(0x900000, 0xa00000),
            map(0x10000, 0x20000),
            map(0x20000, 0x21000),
        ];
        let stacks = Stacks::new(&maps);
        assert_eq!(stacks.extent(0x1fffc), Some((0x1fff8, 8)));
        assert_eq!(stacks.extent(0x20000), Some((0x20000, 0x1000)));
        assert_eq!(stacks.extent(0x10000), Some((0x10000, 0x10000)));
        assert_eq!(stacks.extent(0x900010), Some((0x900010, STACK_SCAN as usize)));
        assert_eq!(stacks.extent(0x21000), None);
        assert_eq!(stacks.extent(0xfff), None);
        assert_eq!(stacks.extent(0xa00000), None);
    }
}
