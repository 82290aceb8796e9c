//! Running the tool at real-time priority while it works on a target
//! (DESIGN.md §3, issue 10 "the tool's own CPU"). A normal-priority tool
//! competing with the target's own busy threads gets a 1/(N+1) share of
//! the CPUs, and every step of an apply or a stop waits its turn: measured
//! here at 64 busy threads on 2 cores, a stop of every thread held 163 ms
//! (median) at normal priority, 5 ms at `SCHED_FIFO`; an apply under 8
//! busy threads took 133–208 ms at normal priority, 31–36 ms at
//! `SCHED_FIFO`.
//!
//! At `SCHED_FIFO` the tool must never spin waiting for a target thread:
//! `sched_yield` gives the CPU only to threads of the same real-time
//! priority, never to the target's normal-priority threads. Every wait
//! sleeps instead ([`is_realtime`], `ptrace::Backoff`).

use nix::libc;

mod guardian;

/// While alive, the calling thread runs at `SCHED_FIFO` priority 1 (the
/// lowest real-time priority) if it may; dropping it restores the policy
/// it had. Threads and processes it starts meanwhile run at normal
/// priority (`SCHED_RESET_ON_FORK`): only the thread that waits for the
/// target is raised. Where it may not (not root, `RLIMIT_RTPRIO` 0, a
/// cgroup without real-time runtime) it does nothing and says so in a
/// debug log.
#[derive(Debug)]
pub struct Boost {
    previous: Option<(libc::c_int, libc::sched_param)>,
}

impl Boost {
    pub fn realtime() -> Boost {
        // SAFETY: sched_getscheduler/sched_getparam/sched_setscheduler on
        // the calling thread (pid 0) only read or write the `sched_param`
        // we pass, which lives on this stack frame for the whole call.
        unsafe {
            let policy = libc::sched_getscheduler(0);
            let mut param: libc::sched_param = std::mem::zeroed();
            if policy < 0 || libc::sched_getparam(0, &mut param) != 0 {
                return Boost { previous: None };
            }
            if realtime_policy(policy) {
                return Boost { previous: None };
            }
            let fifo = libc::sched_param { sched_priority: 1 };
            if libc::sched_setscheduler(0, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &fifo) != 0 {
                tracing::debug!(
                    "no real-time priority, working at normal priority: {}",
                    std::io::Error::last_os_error()
                );
                return Boost { previous: None };
            }
            Boost {
                previous: Some((policy, param)),
            }
        }
    }

    /// Whether the boost took effect.
    pub fn active(&self) -> bool {
        self.previous.is_some()
    }
}

impl Drop for Boost {
    fn drop(&mut self) {
        if let Some((policy, param)) = self.previous.take() {
            // SAFETY: as in `realtime`: `param` is a valid `sched_param`
            // owned by this frame for the duration of the call.
            let r = unsafe { libc::sched_setscheduler(0, policy, &param) };
            if r != 0 {
                tracing::warn!(
                    "restoring the scheduling policy failed: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// `sched_getscheduler`'s answer names a real-time policy (it may carry
/// the `SCHED_RESET_ON_FORK` flag).
fn realtime_policy(policy: libc::c_int) -> bool {
    policy >= 0
        && matches!(
            policy & !libc::SCHED_RESET_ON_FORK,
            libc::SCHED_FIFO | libc::SCHED_RR
        )
}

/// Whether the calling thread runs at a real-time policy (raised by a
/// [`Boost`], or started so, e.g. under `chrt -f`).
pub fn is_realtime() -> bool {
    // SAFETY: reads the calling thread's policy; no memory is passed.
    realtime_policy(unsafe { libc::sched_getscheduler(0) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> libc::c_int {
        // SAFETY: reads the calling thread's policy only.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[test]
    fn boost_is_undone_on_drop() {
        let before = policy();
        {
            let boost = Boost::realtime();
            if boost.active() {
                assert_eq!(policy() & !libc::SCHED_RESET_ON_FORK, libc::SCHED_FIFO);
                assert!(is_realtime());
            }
        }
        assert_eq!(policy(), before);
        assert!(!is_realtime());
    }

    #[test]
    fn a_boost_inside_a_boost_keeps_the_outer_one() {
        let outer = Boost::realtime();
        if !outer.active() {
            eprintln!("no real-time priority here (not root?): nothing to test");
            return;
        }
        {
            let inner = Boost::realtime();
            assert!(!inner.active(), "already real-time: the inner boost does nothing");
        }
        assert!(
            is_realtime(),
            "the inner boost's drop left the outer one in place"
        );
        drop(outer);
        assert!(!is_realtime());
    }

    #[test]
    fn threads_started_while_boosted_run_at_normal_priority() {
        let boost = Boost::realtime();
        if !boost.active() {
            eprintln!("no real-time priority here (not root?): nothing to test");
            return;
        }
        let inner = std::thread::spawn(is_realtime).join().expect("thread");
        assert!(
            !inner,
            "a thread the boosted tool starts must not inherit SCHED_FIFO"
        );
    }
}

/// `struct sched_attr` (`include/uapi/linux/sched/types.h`), 56 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
    util_min: u32,
    util_max: u32,
}

const SCHED_FLAG_RESET_ON_FORK: u64 = 1;

impl SchedAttr {
    fn bytes(&self) -> [u8; 56] {
        let mut b = [0u8; 56];
        b[0..4].copy_from_slice(&self.size.to_le_bytes());
        b[4..8].copy_from_slice(&self.policy.to_le_bytes());
        b[8..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..20].copy_from_slice(&self.nice.to_le_bytes());
        b[20..24].copy_from_slice(&self.priority.to_le_bytes());
        b[24..32].copy_from_slice(&self.runtime.to_le_bytes());
        b[32..40].copy_from_slice(&self.deadline.to_le_bytes());
        b[40..48].copy_from_slice(&self.period.to_le_bytes());
        b[48..52].copy_from_slice(&self.util_min.to_le_bytes());
        b[52..56].copy_from_slice(&self.util_max.to_le_bytes());
        b
    }
}

fn sched_getattr(tid: i32) -> Result<SchedAttr, std::io::Error> {
    let mut attr = SchedAttr::default();
    // SAFETY: the kernel writes at most `size` (56) bytes into `attr`, a
    // `repr(C)` struct of exactly that layout on this frame.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            tid,
            &mut attr as *mut SchedAttr,
            56u32,
            0u32,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(attr)
}

fn sched_setattr(tid: i32, attr: &SchedAttr) -> Result<(), std::io::Error> {
    // SAFETY: the kernel reads `attr.size` (56) bytes from `attr`, which
    // lives on the caller's frame for the whole call.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, tid, attr as *const SchedAttr, 0u32) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether thread `tid` of `pid` runs without seccomp filters: only such
/// a thread is lent a priority (one that refused the program's
/// `sched_setattr` would keep the loan for good).
fn unfiltered(pid: i32, tid: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
    let seccomp = super::preflight::field(&status, "Seccomp");
    if seccomp != Some("0") {
        tracing::debug!(tid, ?seccomp, "no priority lent to a thread under seccomp");
        return false;
    }
    true
}

fn is_realtime_attr(a: &SchedAttr) -> bool {
    [libc::SCHED_FIFO, libc::SCHED_RR, 6 /* SCHED_DEADLINE */].contains(&(a.policy as i32))
}

/// What a loan sets: `SCHED_FIFO` 1, keeping the thread's reset-on-fork.
fn fifo_for(own: &SchedAttr) -> SchedAttr {
    SchedAttr {
        size: 56,
        policy: libc::SCHED_FIFO as u32,
        flags: own.flags & SCHED_FLAG_RESET_ON_FORK,
        priority: 1,
        ..SchedAttr::default()
    }
}

/// Lend thread `tid` of a target `SCHED_FIFO` priority 1 for the program
/// it is about to run: its own attributes are written at `at` first (the
/// program restores them itself on its way out, so the loan ends with the
/// program whatever happens to the tool); a thread already at a real-time
/// policy is left alone. `early`: a loan made before the thread stopped
/// ([`EarlyLoan`]), whose attributes are the ones to give back. Best
/// effort: without the right to raise it (not root, no `RLIMIT_RTPRIO`),
/// nothing changes. Returns whether the program now holds the loan (it
/// will restore what is at `at`).
pub fn lend(mem: &crate::process::Mem, tid: i32, at: u64, early: Option<&EarlyLoan>) -> bool {
    let own = match early {
        Some(loan) => loan.own,
        None => {
            if !unfiltered(mem.pid(), tid) {
                return false;
            }
            match sched_getattr(tid) {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(tid, "sched_getattr: {e}; no priority lent");
                    return false;
                }
            }
        }
    };
    if is_realtime_attr(&own) {
        return false;
    }
    let own = SchedAttr { size: 56, ..own };
    if let Err(e) = mem.write(at, &own.bytes()) {
        tracing::debug!(tid, "recording the thread's scheduling: {e}; no priority lent");
        return false;
    }
    if early.is_some() {
        // Raised already.
        return true;
    }
    if let Err(e) = sched_setattr(tid, &fifo_for(&own)) {
        tracing::debug!(tid, "no real-time priority lent to the borrowed thread: {e}");
        return false;
    }
    true
}

/// A priority lent to a target thread *before* it reached its ptrace stop:
/// interrupted while it waits for a CPU among busy threads, a thread at
/// normal priority takes its turn first (2–45 ms measured among 8 busy
/// threads on 2 cores), at `SCHED_FIFO` 1 it stops within 50 µs. Until
/// the program holds the loan ([`EarlyLoan::settle`], after [`lend`]),
/// the tool owes it: dropping the loan gives the thread its attributes
/// back, and the [`Guardian`] does if the tool dies first.
#[derive(Debug)]
pub struct EarlyLoan {
    tid: i32,
    own: SchedAttr,
    settled: bool,
}

impl EarlyLoan {
    /// Raise thread `tid` of `pid` now, if it is a thread that may be lent
    /// one (no seccomp filter, not real-time already) and the guardian
    /// runs; `None` otherwise (nothing changed).
    pub fn make(pid: i32, tid: i32) -> Option<EarlyLoan> {
        if !unfiltered(pid, tid) {
            return None;
        }
        let own = SchedAttr {
            size: 56,
            ..sched_getattr(tid).ok()?
        };
        if is_realtime_attr(&own) {
            return None;
        }
        // The guardian hears of the loan before it exists: a tool killed
        // right after the raise leaves it a loan to give back.
        guardian::record(guardian::Record::lent(tid, &own)).ok()?;
        if let Err(e) = sched_setattr(tid, &fifo_for(&own)) {
            tracing::debug!(tid, "no early priority lent: {e}");
            let _ = guardian::record(guardian::Record::ended(tid));
            return None;
        }
        Some(EarlyLoan {
            tid,
            own,
            settled: false,
        })
    }

    /// The program holds the loan now (it restores the thread itself).
    pub fn settle(mut self) {
        self.settled = true;
        let _ = guardian::record(guardian::Record::ended(self.tid));
    }
}

impl Drop for EarlyLoan {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        // Only undo our own loan: a thread whose policy changed since is
        // left as it is now.
        if sched_getattr(self.tid).is_ok_and(|a| a.policy == libc::SCHED_FIFO as u32 && a.priority == 1)
            && let Err(e) = sched_setattr(self.tid, &self.own)
        {
            tracing::warn!(tid = self.tid, "giving back a lent priority failed: {e}");
        }
        let _ = guardian::record(guardian::Record::ended(self.tid));
    }
}

/// The scheduling policy of thread `tid` (for tests and doctor).
pub fn policy_of(tid: i32) -> Option<i32> {
    sched_getattr(tid).ok().map(|a| a.policy as i32)
}
