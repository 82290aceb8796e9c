//! Stopping every thread of a process for a write that running threads
//! must not see half-done. Dropping the guard resumes them all.

use super::ptrace::Traced;
use super::{ProcessError, threads};
use std::time::{Duration, Instant};

/// Every thread of a process, stopped. The set is stable: a thread that
/// was created while we stopped the others is stopped too (a stopped
/// thread cannot create more).
#[derive(Debug)]
pub struct AllStopped {
    pid: i32,
    threads: Vec<Traced>,
    /// How long the stop took to establish.
    pub took: Duration,
}

impl AllStopped {
    /// Seize and interrupt every thread; `timeout` bounds the whole stop.
    pub fn stop(pid: i32, timeout: Duration) -> Result<AllStopped, ProcessError> {
        let start = Instant::now();
        let mut stopped = AllStopped {
            pid,
            threads: Vec::new(),
            took: Duration::ZERO,
        };
        loop {
            let known: Vec<i32> = stopped.threads.iter().map(Traced::tid).collect();
            // Thread ids only: a thread's files are not needed to stop it
            // (at 500 threads, reading them cost more than the stop).
            let new: Vec<i32> = threads::tids(pid)?
                .into_iter()
                .filter(|tid| !known.contains(tid))
                .collect();
            if new.is_empty() {
                break;
            }
            let first_new = stopped.threads.len();
            for tid in new {
                match Traced::seize(pid, tid) {
                    Ok(mut t) => {
                        t.request_stop()?;
                        stopped.threads.push(t);
                    }
                    // It exited between the listing and the seize.
                    Err(ProcessError::NoSuchThread { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            for t in &mut stopped.threads[first_new..] {
                let left = timeout
                    .saturating_sub(start.elapsed())
                    .max(Duration::from_millis(1));
                match t.interrupt(left) {
                    Ok(()) => {}
                    Err(ProcessError::Exited { .. }) | Err(ProcessError::NoSuchThread { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            if start.elapsed() > timeout {
                return Err(ProcessError::Timeout {
                    pid,
                    tid: pid,
                    what: "stopping every thread (threads keep appearing)".into(),
                    after: timeout,
                });
            }
        }
        if stopped.threads.is_empty() {
            return Err(ProcessError::NoSuchProcess { pid });
        }
        stopped.took = start.elapsed();
        Ok(stopped)
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// `(tid, rip)` of every stopped thread.
    pub fn rips(&self) -> Result<Vec<(i32, u64)>, ProcessError> {
        let mut out = Vec::with_capacity(self.threads.len());
        for t in &self.threads {
            match t.regs() {
                Ok(r) => out.push((t.tid(), r.rip)),
                Err(ProcessError::Exited { .. }) | Err(ProcessError::NoSuchThread { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// `(tid, registers)` of every stopped thread.
    pub fn registers(&self) -> Result<Vec<(i32, super::ptrace::Regs)>, ProcessError> {
        let mut out = Vec::with_capacity(self.threads.len());
        for t in &self.threads {
            match t.regs() {
                Ok(r) => out.push((t.tid(), r)),
                Err(ProcessError::Exited { .. }) | Err(ProcessError::NoSuchThread { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Single-step thread `tid` by one instruction while every other
    /// thread stays stopped (see [`Traced::step`]); its registers after.
    pub fn step(&mut self, tid: i32, timeout: Duration) -> Result<super::ptrace::Regs, ProcessError> {
        let pid = self.pid;
        let thread = self
            .threads
            .iter_mut()
            .find(|t| t.tid() == tid)
            .ok_or(ProcessError::NoSuchThread { pid, tid })?;
        thread.step(timeout)?;
        thread.regs()
    }

    /// Resume every thread now (dropping does the same).
    pub fn resume(self) {}
}
