//! One traced thread: `PTRACE_SEIZE` (never with `PTRACE_O_EXITKILL`),
//! `PTRACE_INTERRUPT`, a bounded wait for the stop, registers, detach.
//!
//! [`Traced`] detaches when dropped, so no error path leaves a thread
//! stopped or traced. If this process dies instead, the kernel detaches
//! every tracee and resumes it (`exit_ptrace`), with whatever registers it
//! was last given: callers must keep the target consistent at every
//! `PTRACE_SETREGS`.
//!
//! ptrace requests must come from the thread that seized: a [`Traced`] is
//! not `Send`.

use super::ProcessError;
use super::error::ptrace_hint;
use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use std::marker::PhantomData;
use std::time::{Duration, Instant};

pub use nix::libc::user_regs_struct as Regs;

/// How long [`Traced`]'s drop waits for a stop it asked for before it can
/// detach.
const DROP_WAIT: Duration = Duration::from_secs(5);

/// `PTRACE_EVENT_STOP`: the stop `PTRACE_INTERRUPT` and group stops report.
const PTRACE_EVENT_STOP: i32 = 128;

/// A thread we trace. Dropping it detaches (after waiting for a pending
/// stop, since only a stopped tracee can be detached).
#[derive(Debug)]
pub struct Traced {
    pid: i32,
    tid: i32,
    /// We asked for a stop that has not been reported yet.
    stop_pending: bool,
    /// The thread is in a ptrace stop now.
    stopped: bool,
    /// Still our tracee (false once detached or gone).
    attached: bool,
    /// ptrace requests are per tracer *thread*.
    _not_send: PhantomData<*const ()>,
}

impl Traced {
    /// `PTRACE_SEIZE` thread `tid` of `pid`: it keeps running.
    pub fn seize(pid: i32, tid: i32) -> Result<Traced, ProcessError> {
        match ptrace::seize(Pid::from_raw(tid), ptrace::Options::empty()) {
            Ok(()) => Ok(Traced {
                pid,
                tid,
                stop_pending: false,
                stopped: false,
                attached: true,
                _not_send: PhantomData,
            }),
            Err(Errno::ESRCH) => Err(ProcessError::NoSuchThread { pid, tid }),
            Err(Errno::EPERM) => Err(ProcessError::PtraceDenied {
                pid,
                tid,
                hint: ptrace_hint(pid, tid),
            }),
            Err(source) => Err(self::error(pid, tid, "SEIZE", source)),
        }
    }

    pub fn tid(&self) -> i32 {
        self.tid
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// In a ptrace stop now.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Still traced by us (not detached, not exited).
    pub fn is_attached(&self) -> bool {
        self.attached
    }

    fn err(&self, op: &'static str, source: Errno) -> ProcessError {
        if source == Errno::ESRCH && !super::threads::thread_exists(self.pid, self.tid) {
            return ProcessError::Exited {
                pid: self.pid,
                tid: self.tid,
                during: format!("during ptrace {op}"),
            };
        }
        error(self.pid, self.tid, op, source)
    }

    /// `PTRACE_INTERRUPT` and wait (at most `timeout`) until the thread is in
    /// the interrupt stop. Signals that arrive meanwhile are delivered, not
    /// swallowed. A process in group stop (SIGSTOP) is reported as an error
    /// and left stopped.
    pub fn interrupt(&mut self, timeout: Duration) -> Result<(), ProcessError> {
        self.request_stop()?;
        if self.stopped {
            return Ok(());
        }
        self.wait_stop(timeout)
    }

    /// Send `PTRACE_INTERRUPT` without waiting, so that many threads can be
    /// asked at once and then waited for with [`Traced::interrupt`].
    pub fn request_stop(&mut self) -> Result<(), ProcessError> {
        if !self.stopped && !self.stop_pending {
            ptrace::interrupt(Pid::from_raw(self.tid)).map_err(|e| self.err("INTERRUPT", e))?;
            self.stop_pending = true;
        }
        Ok(())
    }

    fn wait_stop(&mut self, timeout: Duration) -> Result<(), ProcessError> {
        let start = Instant::now();
        let mut backoff = Backoff::new(WAIT_NAP_MAX);
        loop {
            if self.poll_stop()? {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(ProcessError::Timeout {
                    pid: self.pid,
                    tid: self.tid,
                    what: "waiting for the thread to stop".into(),
                    after: timeout,
                });
            }
            backoff.pause();
        }
    }

    /// Whether the stop asked for by [`Traced::request_stop`] has been
    /// reached, without waiting (`waitpid` of this thread, `WNOHANG`): one
    /// system call when nothing else happened. Signals that arrive
    /// meanwhile are delivered, not swallowed; a group stop (SIGSTOP) is
    /// reported as an error and left in place; a thread that exited is
    /// reaped and reported as [`ProcessError::Exited`].
    pub fn poll_stop(&mut self) -> Result<bool, ProcessError> {
        if self.stopped {
            return Ok(true);
        }
        let pid = Pid::from_raw(self.tid);
        // Bounded: a flood of signals must not keep the caller here.
        for _ in 0..64 {
            let status = waitpid(pid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG));
            match status {
                Ok(WaitStatus::PtraceEvent(_, Signal::SIGTRAP, PTRACE_EVENT_STOP)) => {
                    self.stopped = true;
                    self.stop_pending = false;
                    return Ok(true);
                }
                Ok(WaitStatus::PtraceEvent(_, sig, PTRACE_EVENT_STOP)) => {
                    // Group stop: the process is being stopped by `sig`.
                    // Detaching leaves it in that stop, as it should be.
                    self.stopped = true;
                    self.stop_pending = false;
                    return Err(ProcessError::NoUsableThread {
                        pid: self.pid,
                        why: format!("the process is stopped by {sig} (job control)"),
                    });
                }
                Ok(WaitStatus::Stopped(_, sig)) => {
                    // Signal-delivery stop: deliver the signal, keep waiting
                    // for the interrupt, which is still pending.
                    ptrace::cont(pid, sig).map_err(|e| self.err("CONT", e))?;
                }
                Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) | Err(Errno::ECHILD) => {
                    self.attached = false;
                    self.stop_pending = false;
                    return Err(ProcessError::Exited {
                        pid: self.pid,
                        tid: self.tid,
                        during: "while being interrupted".into(),
                    });
                }
                Ok(WaitStatus::StillAlive) => return Ok(false),
                Err(Errno::EINTR) => {}
                Ok(other) => {
                    // PTRACE_EVENT_* we never asked for, syscall stops: resume.
                    tracing::debug!(tid = self.tid, ?other, "unexpected ptrace stop");
                    ptrace::cont(pid, None).map_err(|e| self.err("CONT", e))?;
                }
                Err(e) => return Err(self.err("wait", e)),
            }
        }
        Ok(false)
    }

    /// `PTRACE_SINGLESTEP` the stopped thread by one instruction, the
    /// thread's other state untouched, and wait (at most `timeout`) until
    /// it stops again. A signal that arrives instead is delivered (the
    /// thread steps into its handler). If the step does not end in time (an
    /// instruction that blocks, such as a system call), the thread is
    /// interrupted again and the timeout reported: it is stopped either way
    /// unless it exited.
    pub fn step(&mut self, timeout: Duration) -> Result<(), ProcessError> {
        self.require_stopped("SINGLESTEP")?;
        let pid = Pid::from_raw(self.tid);
        ptrace::step(pid, None).map_err(|e| self.err("SINGLESTEP", e))?;
        self.stopped = false;
        let start = Instant::now();
        let mut backoff = Backoff::new(WAIT_NAP_MAX);
        loop {
            match waitpid(pid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Stopped(_, Signal::SIGTRAP)) | Ok(WaitStatus::PtraceEvent(..)) => {
                    self.stopped = true;
                    return Ok(());
                }
                Ok(WaitStatus::Stopped(_, sig)) => {
                    ptrace::step(pid, sig).map_err(|e| self.err("SINGLESTEP", e))?;
                }
                Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) | Err(Errno::ECHILD) => {
                    self.attached = false;
                    return Err(ProcessError::Exited {
                        pid: self.pid,
                        tid: self.tid,
                        during: "while single-stepping".into(),
                    });
                }
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(self.err("wait", e)),
            }
            if start.elapsed() >= timeout {
                self.interrupt(DROP_WAIT)?;
                return Err(ProcessError::Timeout {
                    pid: self.pid,
                    tid: self.tid,
                    what: "single-stepping one instruction".into(),
                    after: timeout,
                });
            }
            backoff.pause();
        }
    }

    fn require_stopped(&self, op: &'static str) -> Result<(), ProcessError> {
        if self.stopped && self.attached {
            Ok(())
        } else {
            Err(error(self.pid, self.tid, op, Errno::ESRCH))
        }
    }

    /// `PTRACE_GETREGS`. The thread must be stopped.
    pub fn regs(&self) -> Result<Regs, ProcessError> {
        self.require_stopped("GETREGS")?;
        ptrace::getregs(Pid::from_raw(self.tid)).map_err(|e| self.err("GETREGS", e))
    }

    /// `PTRACE_SETREGS`. The thread must be stopped. From here on, if this
    /// process dies the thread resumes with `regs`.
    pub fn set_regs(&self, regs: &Regs) -> Result<(), ProcessError> {
        self.require_stopped("SETREGS")?;
        ptrace::setregs(Pid::from_raw(self.tid), *regs).map_err(|e| self.err("SETREGS", e))
    }

    /// `PTRACE_DETACH`: the thread resumes (or stays in group stop).
    pub fn detach(mut self) -> Result<(), ProcessError> {
        self.detach_now()
    }

    fn detach_now(&mut self) -> Result<(), ProcessError> {
        if !self.attached {
            return Ok(());
        }
        if !self.stopped {
            // Only a stopped tracee can be detached: get it stopped first.
            if let Err(e) = self.interrupt(DROP_WAIT) {
                if !self.attached {
                    return Ok(());
                }
                if !self.stopped {
                    return Err(e);
                }
            }
        }
        let r = ptrace::detach(Pid::from_raw(self.tid), None);
        self.attached = false;
        self.stopped = false;
        match r {
            Ok(()) => Ok(()),
            Err(Errno::ESRCH) if !super::threads::thread_exists(self.pid, self.tid) => Ok(()),
            Err(e) => Err(error(self.pid, self.tid, "DETACH", e)),
        }
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        if let Err(e) = self.detach_now() {
            tracing::warn!(
                pid = self.pid,
                tid = self.tid,
                error = %e,
                "could not detach; the kernel releases the thread when this thread exits"
            );
        }
    }
}

/// The longest nap between two looks at something a target thread is
/// about to do (reach a stop, finish a call): the tool sleeps while it
/// waits, and a short nap keeps it from being late by more than this.
pub(crate) const WAIT_NAP_MAX: Duration = Duration::from_micros(200);

/// Polling for something another thread or process does: yield the CPU
/// for the first [`Backoff::SPIN`] (most waits end within tens of µs; a
/// `sleep` costs at least the timer slack, ~50 µs), then sleep with
/// doubling naps up to a cap.
///
/// A real-time caller (see [`super::priority`]) sleeps from the first
/// pause: its `sched_yield` would hand the CPU to no normal-priority
/// thread, so it would hold the CPU that the target thread it waits for
/// may need (and its sleeps have no timer slack).
#[derive(Debug)]
pub(crate) struct Backoff {
    start: Instant,
    nap: Duration,
    max: Duration,
    spin: bool,
}

/// What [`Backoff`] does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pause {
    Yield,
    Sleep(Duration),
}

impl Backoff {
    pub(crate) const SPIN: Duration = Duration::from_micros(200);

    pub(crate) fn new(max: Duration) -> Backoff {
        Backoff {
            start: Instant::now(),
            nap: Duration::from_micros(20),
            max,
            spin: !super::priority::is_realtime(),
        }
    }

    fn next(&mut self) -> Pause {
        if self.spin && self.start.elapsed() < Self::SPIN {
            Pause::Yield
        } else {
            let nap = self.nap;
            self.nap = (self.nap * 2).min(self.max);
            Pause::Sleep(nap)
        }
    }

    /// Wait a little before the next look.
    pub(crate) fn pause(&mut self) {
        match self.next() {
            Pause::Yield => {
                std::hint::spin_loop();
                std::thread::yield_now();
            }
            Pause::Sleep(nap) => std::thread::sleep(nap),
        }
    }
}

fn error(pid: i32, tid: i32, op: &'static str, source: Errno) -> ProcessError {
    ProcessError::Ptrace {
        pid,
        tid,
        op,
        error: source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::Boost;

    #[test]
    fn backoff_yields_first_at_normal_priority() {
        assert!(!crate::process::priority::is_realtime());
        let mut b = Backoff::new(Duration::from_millis(1));
        assert_eq!(b.next(), Pause::Yield);
    }

    #[test]
    fn backoff_never_yields_at_realtime_priority() {
        let boost = Boost::realtime();
        if !boost.active() {
            eprintln!("no real-time priority here (not root?): nothing to test");
            return;
        }
        let mut b = Backoff::new(Duration::from_micros(100));
        let naps: Vec<Pause> = (0..5).map(|_| b.next()).collect();
        let us = |n| Pause::Sleep(Duration::from_micros(n));
        assert_eq!(naps, [us(20), us(40), us(80), us(100), us(100)]);
    }
}
