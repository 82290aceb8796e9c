//! Sending one thread of the target into the stub: which thread, and
//! the seize, interrupt, writes and `SETREGS` that start a call.

use super::*;

/// Which thread to take.
#[derive(Debug, Clone, Copy)]
pub(super) struct Choice {
    pub(super) pinned: Option<i32>,
    pub(super) seed: u64,
    /// The threads the caller's preflight judged: at
    /// [`Scope::PlainThreads`], a thread is used only if it is plain
    /// ([`preflight::thread_unfit`]), or after a look at every thread
    /// allowed it (which widens this to [`Scope::EveryThread`]).
    pub(super) scope: Scope,
    /// What the session is for (the calls a look at every thread judges).
    pub(super) op: Operation,
    /// A thread slow to stop may be lent a real-time priority early
    /// ([`priority::EarlyLoan`]): taken over by a program that gives it
    /// back itself ([`Hijack::lend_priority`]), else returned to the
    /// caller, who holds it until its call is done.
    pub(super) lend: bool,
}

/// How long an interrupted thread may take to stop before it is lent a
/// priority: one that waits in a system call stops within tens of µs when
/// a CPU is free.
const QUICK_STOP: Duration = Duration::from_micros(300);

impl Default for Choice {
    /// Any thread, each checked before use.
    fn default() -> Choice {
        Choice {
            pinned: None,
            seed: 0,
            scope: Scope::PlainThreads,
            op: Operation::Apply,
            lend: false,
        }
    }
}

/// A seed for [`threads::pick_spread`]: the call counter mixed with the
/// clock (splitmix64), so choices do not follow the caller's patterns.
pub(super) fn spread_seed(calls: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let mut z = calls.wrapping_add(nanos).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What to do to a stopped thread to start a call.
pub(super) struct Hijack {
    /// A word to write on the thread's stack first, with the program's own
    /// access rights (`process_vm_writev`: no write into a read-only or
    /// guard page); when refused, another thread is tried.
    pub(super) stack: Option<(u64, u64)>,
    /// Memory writes, done before SETREGS.
    pub(super) writes: Vec<(u64, Vec<u8>)>,
    pub(super) regs: Regs,
    /// Lend the thread a real-time priority for the call: its own
    /// scheduling attributes go to this address (a `struct sched_attr`
    /// the program restores from as its last step, see
    /// `program::Program::restore_scheduling`).
    pub(super) lend_priority: Option<u64>,
}

/// The plan of a hijack: the stopped thread's registers, the target's
/// maps (if the hijack was given maps; else empty) and the thread's tid →
/// what to do, or `None` (try another thread).
pub(super) type Plan<'a> = dyn FnMut(&Regs, &[MapEntry], i32) -> Option<Hijack> + 'a;

/// Seize a thread, let `plan` turn its registers into the writes and
/// registers that start a call (or `None`: pick another thread), write,
/// SETREGS, detach. Returns the tid. `committed` is
/// set once a SETREGS succeeded: from then on the thread runs the stub,
/// whatever happens to this tool.
pub(super) fn hijack(
    pid: i32,
    mem: &Mem,
    timeouts: Timeouts,
    choice: &mut Choice,
    maps: Option<&[MapEntry]>,
    committed: &mut bool,
    plan: &mut Plan<'_>,
) -> Result<(i32, Option<priority::EarlyLoan>), ProcessError> {
    let mut excluded: Vec<i32> = Vec::new();
    // Threads left out as not plain while only the main thread was judged.
    let mut unfit: Vec<i32> = Vec::new();
    let mut last_err = None;
    let mut attempts = 0;
    while attempts < 4 {
        let t0 = Instant::now();
        let chosen = match choice.pinned {
            Some(tid) if excluded.contains(&tid) => None,
            Some(tid) => match threads::thread_info(pid, tid) {
                Ok(t) => t.rank().is_some().then_some(t),
                Err(ProcessError::NoSuchThread { .. }) => None,
                Err(e) => return Err(e),
            },
            // A sample, not every thread's files (see `threads::sample`).
            None => threads::sample(pid, choice.seed, &excluded)?,
        };
        let Some(t) = chosen else {
            if unfit.is_empty() || choice.scope == Scope::EveryThread {
                break;
            }
            // Only threads that are not plain are left: judge every
            // thread now, and take them only if every one may run the
            // calls (no filter refuses one, nothing else stands in the way).
            let report = preflight::require(pid, Depth::Full, choice.op)?;
            if report.scope != Scope::EveryThread {
                return Err(ProcessError::NoUsableThread {
                    pid,
                    why: format!(
                        "the threads without a seccomp filter cannot be used now, and the others' filters refuse what hotpatch does: {}",
                        report
                            .findings
                            .iter()
                            .find(|f| f.check == preflight::Check::Seccomp)
                            .map_or("", |f| f.detail.as_str())
                    ),
                });
            }
            choice.scope = Scope::EveryThread;
            excluded.retain(|tid| !unfit.contains(tid));
            unfit.clear();
            continue;
        };
        if choice.scope == Scope::PlainThreads
            && let Some(why) = preflight::thread_unfit(pid, t.tid)
        {
            tracing::debug!(pid, tid = t.tid, why, "thread not plain; next thread");
            excluded.push(t.tid);
            unfit.push(t.tid);
            continue;
        }
        attempts += 1;
        let t_threads = t0.elapsed();
        let mut traced = match Traced::seize(pid, t.tid) {
            Ok(tr) => tr,
            Err(ProcessError::NoSuchThread { .. }) => {
                excluded.push(t.tid);
                continue;
            }
            Err(e) => return Err(e),
        };
        // A thread that does not stop at once waits for a CPU: lend it a
        // real-time priority for the rest of the way (given back if it is
        // not sent into the stub, by the program if it is).
        let mut loan = None;
        let mut stop = traced.interrupt(QUICK_STOP.min(timeouts.stop));
        if matches!(stop, Err(ProcessError::Timeout { .. })) {
            if choice.lend {
                loan = priority::EarlyLoan::make(pid, t.tid);
            }
            stop = traced.interrupt(timeouts.stop.saturating_sub(QUICK_STOP));
        }
        match stop {
            Ok(()) => {}
            Err(e @ (ProcessError::Exited { .. } | ProcessError::Timeout { .. })) => {
                excluded.push(t.tid);
                last_err = Some(e);
                continue;
            }
            Err(e) => return Err(e),
        }
        let t_int = t0.elapsed();
        let regs = traced.regs()?;
        let h = plan(&regs, maps.unwrap_or(&[]), t.tid);
        let Some(h) = h else {
            tracing::debug!(
                pid,
                tid = t.tid,
                rsp = regs.rsp,
                "thread's stack unusable; next thread"
            );
            excluded.push(t.tid);
            continue;
        };
        if let Some((addr, value)) = h.stack
            && !write_as_program(pid, addr, value)?
        {
            tracing::debug!(pid, tid = t.tid, addr, "thread's stack not writable; next thread");
            excluded.push(t.tid);
            continue;
        }
        for (addr, bytes) in &h.writes {
            mem.write(*addr, bytes)?;
        }
        // From here the thread is committed to the stub, tool or not.
        traced.set_regs(&h.regs)?;
        *committed = true;
        if let Some(at) = h.lend_priority {
            // After SETREGS (a tool killed before leaves it as it was, or
            // to the guardian with an early loan) and while it is stopped
            // (the program cannot have restored yet): what it had, where
            // the program restores it from, then raised.
            if priority::lend(mem, t.tid, at, loan.as_ref())
                && let Some(l) = loan.take()
            {
                l.settle();
            }
        } else if choice.lend && loan.is_none() {
            // A call with no program to give a priority back (a cave
            // call): lent now, held by the caller until the call is done,
            // so that its few system calls do not wait for a CPU either.
            loan = priority::EarlyLoan::make(pid, t.tid);
        }
        traced.detach()?;
        tracing::trace!(
            pid,
            tid = t.tid,
            threads = ?t_threads,
            interrupt = ?t_int,
            all = ?t0.elapsed(),
            "hijacked"
        );
        return Ok((t.tid, loan));
    }
    Err(last_err.unwrap_or_else(|| ProcessError::NoUsableThread {
        pid,
        why: threads::threads(pid).map_or_else(
            |_| "no running or sleeping thread could be interrupted with a usable stack".into(),
            |all| threads::why_none_usable(pid, &all),
        ),
    }))
}

/// Write `value` at `addr` in process `pid` as the program itself could
/// (`process_vm_writev` honours page protections, unlike `/proc/PID/mem`);
/// `false` when the page is not writable or not mapped.
pub(super) fn write_as_program(pid: i32, addr: u64, value: u64) -> Result<bool, ProcessError> {
    use nix::sys::uio::{RemoteIoVec, process_vm_writev};
    let bytes = value.to_le_bytes();
    let local = [std::io::IoSlice::new(&bytes)];
    let remote = [RemoteIoVec {
        base: addr as usize,
        len: bytes.len(),
    }];
    match process_vm_writev(nix::unistd::Pid::from_raw(pid), &local, &remote) {
        Ok(8) => Ok(true),
        Ok(_) | Err(nix::errno::Errno::EFAULT) => Ok(false),
        Err(e) => Err(ProcessError::Mem {
            pid,
            op: "process_vm_writev",
            addr,
            len: 8,
            error: e.into(),
        }),
    }
}

/// Whether `[addr, addr + len)` lies in one writable mapping.
pub(super) fn writable(maps: &[MapEntry], addr: u64, len: u64) -> bool {
    maps.iter()
        .any(|m| m.writable && m.start <= addr && addr.checked_add(len).is_some_and(|e| e <= m.end))
}
