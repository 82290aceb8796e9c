//! The call region: where it goes, finding one an earlier session left,
//! and taking it only when no call can be using it.

use super::*;

/// What `/proc/PID/maps` shows for a call region (an anonymous mapping
/// named with `PR_SET_VMA_ANON_NAME`, where the kernel has it).
pub const REGION_NAME: &str = "hotpatch-call";

/// Size of the XSAVE area for the features the OS enabled in XCR0
/// (CPUID leaf 0xD, sub-leaf 0, EBX). XCR0 is the same for every process.
pub fn xsave_size() -> u64 {
    // SAFETY: CPUID is available on every x86-64 CPU; leaf 0xD exists
    // whenever the OS enables XSAVE. (The intrinsic is safe on newer Rust;
    // `unsafe` keeps older compilers happy.)
    #[allow(unused_unsafe)]
    let r = unsafe { std::arch::x86_64::__cpuid_count(0xd, 0) };
    u64::from(r.ebx).max(512 + 64)
}

pub(super) fn check_supported(pid: i32) -> Result<(), ProcessError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| ProcessError::from_io(pid, format!("/proc/{pid}/status").into(), e))?;
    let shstk = status
        .lines()
        .find_map(|l| l.strip_prefix("x86_Thread_features:"))
        .is_some_and(|f| f.split_whitespace().any(|w| w == "shstk"));
    if shstk {
        return Err(ProcessError::Unsupported {
            pid,
            what: "the target uses CET shadow stacks; the remote-call stub returns with `ret` \
                   and would fault"
                .into(),
        });
    }
    Ok(())
}

/// Take the lock of the call region at `base` of process `pid` (an
/// exclusive `flock` on a file per region, released by the kernel when the
/// holder exits; see [`super::lock`]); `None` when another session holds it.
pub(super) fn lock_region(
    pid: i32,
    started: u64,
    base: u64,
) -> Result<Option<crate::process::lock::Lock>, ProcessError> {
    match crate::process::lock::lock_region(pid, started, base)? {
        crate::process::lock::Taken::Locked(l) => Ok(Some(l)),
        crate::process::lock::Taken::Busy(_) => Ok(None),
    }
}

/// The bases of what look like call regions in `maps`: an anonymous
/// private r-x page directly followed by an anonymous private rw-
/// mapping that covers the rest of a [`Layout`]. (Only a look: the
/// contents are checked by [`adopt`].)
pub(super) fn region_bases(maps: &[MapEntry], xsave: u64) -> Vec<u64> {
    let size = Layout::size_for(xsave);
    let named = format!("[anon:{REGION_NAME}]");
    let anon = |m: &MapEntry| m.inode == 0 && m.private && m.path.as_deref().is_none_or(|p| p == named);
    maps.windows(2)
        .filter(|w| {
            let (code, data) = (&w[0], &w[1]);
            anon(code)
                && anon(data)
                && code.readable
                && code.executable
                && !code.writable
                && code.end - code.start >= stub::CODE_SIZE
                && data.start == code.end
                && data.readable
                && data.writable
                && !data.executable
                && data.end >= code.end - stub::CODE_SIZE + size
        })
        .map(|w| w[0].end - stub::CODE_SIZE)
        .collect()
}

/// Whether a region at `layout` satisfies `placement`.
pub(super) fn placed(layout: &Layout, placement: Placement) -> bool {
    match placement {
        Placement::Anywhere => true,
        Placement::Near(a) => layout.base.abs_diff(a) <= REACH && layout.end().abs_diff(a) <= REACH,
    }
}

/// How long a new session waits for the last call in a region to finish
/// (a tool killed mid-call) before it makes a region of its own: when the
/// call's thread is seen in the region, and when it is running (where it
/// is would take an interrupt to know).
pub(super) const ADOPT_WAIT: Duration = Duration::from_millis(20);
pub(super) const ADOPT_WAIT_RUNNING: Duration = Duration::from_millis(2);
pub(super) const ADOPT_WAIT_CANCELLED: Duration = Duration::from_millis(250);

/// Check the region at `layout` (whose lock the caller holds) and make it
/// this session's: the bootstrap marker, the code page holding exactly our
/// stub (or zeros: bootstrapped by a tool killed before it wrote the stub),
/// and no call in flight. `None` when it is not ours or still busy.
///
/// No call is in flight when `DONE` is 1, or when the thread the last call
/// was given to (`OWNER`) has exited. `DONE` goes to 0 with the frame
/// write, before `SETREGS`, and back to 1 when the stub is done with the
/// frame; so with `DONE` 0 and the thread alive, a call may be running
/// (then it gets [`ADOPT_WAIT`] to finish), or its tool was killed just
/// before `SETREGS` — which cannot be told for certain from outside (a
/// signal handler on an alternate stack hides where the thread is), so
/// such a region is never taken: it stays, unused, until that thread
/// exits.
pub(super) fn adopt(
    mem: &Mem,
    layout: &Layout,
    timeouts: Timeouts,
) -> Result<Option<SessionStub>, ProcessError> {
    let pid = mem.pid();
    let stub = stub::session_stub(layout).map_err(|e| ProcessError::Unsupported {
        pid,
        what: format!("assembling the stub: {e}"),
    })?;
    let Ok(code) = mem.read(layout.code(), stub.bytes.len()) else {
        return Ok(None);
    };
    let frame_at = layout.frame();
    let Ok(boot) = mem.read_u64(frame_at + frame::BOOT) else {
        return Ok(None);
    };
    if boot != u64::from(stub::BOOT_MAGIC) {
        return Ok(None);
    }
    let fresh = code.iter().all(|&b| b == 0);
    if !fresh && code != stub.bytes {
        tracing::debug!(
            pid,
            base = layout.base,
            "a call region with another stub (another version?)"
        );
        return Ok(None);
    }
    let owner = mem.read_u64(frame_at + frame::OWNER)?;
    let start = Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(1));
    let mut cancelled = false;
    // A thread on its way out of the stub, lent a priority to get there
    // (given back when this returns).
    let mut loan = None;
    loop {
        let done = mem.read_u32(frame_at + frame::DONE)?;
        if done == 1 || owner == 0 || !threads::thread_exists(pid, owner as i32) {
            break;
        }
        if !cancelled {
            // A program left waiting by a tool that is gone returns now.
            cancelled = running::cancel_waiting(mem, layout.scratch());
            if cancelled {
                tracing::debug!(pid, base = layout.base, owner, "cancelled a program left waiting");
            }
        }
        let wait = match owner_in_region(pid, owner as i32, layout) {
            // A cancelled or ended program is on its way out (it may be
            // runnable and waiting for a CPU, just after giving back a
            // lent priority: 10–40 ms among 8 busy threads on 2 cores):
            // it gets longer.
            _ if cancelled => ADOPT_WAIT_CANCELLED,
            None if running::program_ended(mem, layout.scratch()) => {
                if loan.is_none() {
                    loan = super::priority::EarlyLoan::make(pid, owner as i32);
                }
                ADOPT_WAIT_CANCELLED
            }
            Some(true) => ADOPT_WAIT,
            None => ADOPT_WAIT_RUNNING,
            Some(false) => Duration::ZERO,
        };
        if start.elapsed() >= wait.min(timeouts.call) {
            tracing::debug!(
                pid,
                base = layout.base,
                owner,
                "call region busy: its last call has not returned"
            );
            return Ok(None);
        }
        backoff.pause();
    }
    drop(loan);
    if fresh {
        // Nothing ever ran there: the stub is written before any call.
        mem.write_expecting(layout.code(), &code, &stub.bytes)?;
    }
    mem.write_u32(frame_at + frame::DONE, 1)?;
    Ok(Some(stub))
}

/// Whether thread `tid` is visibly in the region at `layout` (its `pc` in
/// the code page or its `sp` in the region), from
/// `/proc/PID/task/TID/syscall` without interrupting it; `None` while it
/// runs (the kernel does not say).
pub(super) fn owner_in_region(pid: i32, tid: i32, layout: &Layout) -> Option<bool> {
    let info = threads::thread_info(pid, tid).ok()?;
    let (sp, pc) = match info.syscall {
        SyscallState::Blocked { sp, pc } | SyscallState::InSyscall { sp, pc, .. } => (sp, pc),
        _ => return None,
    };
    let region = layout.base..layout.end();
    Some(region.contains(&sp) || (layout.code()..layout.code() + stub::CODE_SIZE).contains(&pc))
}

/// The call regions in process `pid` (their address ranges), made by any
/// session: idle, in use, or with a call that never returned.
pub fn regions(pid: i32) -> Result<Vec<Range<u64>>, ProcessError> {
    let maps = crate::process::Process::open(pid)?.maps()?;
    let mem = Mem::open(pid)?;
    let xsave = xsave_size();
    Ok(region_bases(&maps, xsave)
        .into_iter()
        .map(|b| Layout::new(b, xsave))
        .filter(|l| {
            mem.read_u64(l.frame() + frame::BOOT)
                .is_ok_and(|m| m == u64::from(stub::BOOT_MAGIC))
        })
        .map(|l| l.base..l.end())
        .collect())
}

/// Unmap every idle call region of process `pid` (those that no session
/// holds and whose last call returned); returns how many.
pub fn remove_regions(pid: i32) -> Result<usize, ProcessError> {
    let mut removed = 0;
    while let Some(remote) = Remote::open(
        pid,
        Placement::Anywhere,
        Timeouts::default(),
        Choice::default(),
        false,
    )? {
        remote.release()?;
        removed += 1;
    }
    Ok(removed)
}

/// Free spots for `size` bytes in the address space described by `maps`
/// (sorted), best first: for `Near(a)`, closest to `a` with every byte
/// within ±2 GiB; for `Anywhere`, the highest. Keeps a page away from
/// neighbours, 16 MiB away below `[stack]` (its growth) and 256 MiB above
/// `[heap]` (brk).
pub fn free_spots(maps: &[MapEntry], size: u64, placement: Placement) -> Vec<u64> {
    let size = size.next_multiple_of(PAGE);
    let mut gaps = Vec::new();
    let mut prev_end = USER_MIN;
    let mut prev_heap = false;
    for m in maps.iter().filter(|m| m.start < USER_MAX) {
        let mut lo = prev_end + PAGE;
        if prev_heap {
            lo += 256 << 20;
        }
        let mut hi = m.start.saturating_sub(PAGE);
        if m.path.as_deref() == Some("[stack]") {
            hi = hi.saturating_sub(16 << 20);
        }
        if hi > lo && hi - lo >= size {
            gaps.push((lo, hi));
        }
        prev_end = prev_end.max(m.end);
        prev_heap = m.path.as_deref() == Some("[heap]");
    }
    let lo = prev_end + PAGE + if prev_heap { 256 << 20 } else { 0 };
    if USER_MAX > lo && USER_MAX - lo >= size {
        gaps.push((lo, USER_MAX));
    }
    let mut spots: Vec<u64> = Vec::new();
    match placement {
        Placement::Anywhere => {
            for &(_, hi) in gaps.iter().rev() {
                spots.push(hi - size);
            }
        }
        Placement::Near(a) => {
            let reach = |s: u64| s.abs_diff(a) <= REACH && (s + size).abs_diff(a) <= REACH;
            for &(lo, hi) in &gaps {
                let last = hi - size;
                for c in [
                    lo,
                    last,
                    a.saturating_sub(size).clamp(lo, last),
                    a.clamp(lo, last),
                ] {
                    let c = c & !(PAGE - 1);
                    if c >= lo && c <= last && reach(c) && !spots.contains(&c) {
                        spots.push(c);
                    }
                }
            }
            spots.sort_by_key(|&s| s.abs_diff(a).min((s + size).abs_diff(a)));
        }
    }
    spots
}

/// The call regions of a process, found once in its maps, for a stop of
/// every thread to look up each thread's saved context (see
/// [`CallFrames::saved_context`]) without going over the maps again.
#[derive(Debug, Clone)]
pub struct CallFrames {
    layouts: Vec<Layout>,
}

impl CallFrames {
    pub fn new(maps: &[MapEntry]) -> CallFrames {
        let xsave = xsave_size();
        CallFrames {
            layouts: region_bases(maps, xsave)
                .into_iter()
                .map(|b| Layout::new(b, xsave))
                .collect(),
        }
    }

    /// The context a thread will go back to if it is running a remote
    /// call or a program now (its `rsp` inside a call region): the resume
    /// `rip` the call left on the thread's own stack and that stack's
    /// `rsp`. A stop of every thread must look there too: the thread's
    /// registers show the stub's, not the code it returns to.
    pub fn saved_context(&self, mem: &Mem, rsp: u64) -> Option<(u64, u64)> {
        let layout = self.layouts.iter().find(|l| (l.base..l.end()).contains(&rsp))?;
        let ret_rsp = mem.read_u64(layout.frame() + frame::RET_RSP).ok()?;
        let rip = mem.read_u64(ret_rsp).ok()?;
        Some((rip, ret_rsp.wrapping_add(stub::RED_ZONE + 8)))
    }
}
