//! Stopping every thread of a process for a write that running threads
//! must not see half-done. Dropping the guard resumes them all.

use super::ptrace::{Backoff, Regs, Traced, WAIT_NAP_MAX};
use super::{ProcessError, threads};
use std::time::{Duration, Instant};

/// Every thread of a process, stopped. The set is stable: a thread that
/// was created while we stopped the others is stopped too (a stopped
/// thread cannot create more).
#[derive(Debug)]
pub struct AllStopped {
    pid: i32,
    threads: Vec<Thread>,
    /// How long the stop took to establish, from the first interrupt.
    pub took: Duration,
}

/// One stopped thread and its registers, read when it stopped (only a
/// ptrace request changes them while it stays stopped).
#[derive(Debug)]
struct Thread {
    traced: Traced,
    regs: Option<Regs>,
}

/// Called with the threads that just stopped (tid, registers), batch by
/// batch while the others are still on their way; an error ends the stop.
pub type Observer<'a> = dyn FnMut(&[(i32, Regs)]) -> Result<(), ProcessError> + 'a;

impl AllStopped {
    /// Seize every thread (they keep running), then interrupt them all and
    /// collect their stops in whatever order they come; `timeout` bounds
    /// the whole. [`AllStopped::took`] counts from the first interrupt:
    /// a thread that is only seized runs on unaffected.
    ///
    /// No thread is missed: once every known thread is stopped, the
    /// process's thread count (`/proc/PID/stat`) must equal the number
    /// stopped (a stopped thread creates none); if it does not, the
    /// threads are listed again and any new one stopped too, until a
    /// listing shows none.
    pub fn stop(pid: i32, timeout: Duration) -> Result<AllStopped, ProcessError> {
        Self::stop_watching(pid, timeout, &mut |_| Ok(()))
    }

    /// [`AllStopped::stop`], showing `observer` each thread as soon as it
    /// is stopped, with its registers: work on the stopped ones overlaps
    /// the wait for the others.
    pub fn stop_watching(
        pid: i32,
        timeout: Duration,
        observer: &mut Observer,
    ) -> Result<AllStopped, ProcessError> {
        let start = Instant::now();
        let mut stopped = AllStopped {
            pid,
            threads: Vec::new(),
            took: Duration::ZERO,
        };
        // Thread ids only: a thread's files are not needed to stop it.
        stopped.seize_new()?;
        let began = Instant::now();
        loop {
            for t in &mut stopped.threads {
                match t.traced.request_stop() {
                    Ok(()) => {}
                    // Reaped by the next look at its status.
                    Err(ProcessError::Exited { .. }) | Err(ProcessError::NoSuchThread { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            stopped.collect(start, timeout, observer)?;
            if threads::count(pid)? == stopped.threads.len() {
                break;
            }
            // Threads created before their creator stopped (or a count
            // that includes a thread we cannot trace): look again.
            if stopped.seize_new()? == 0 {
                break;
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
        stopped.took = began.elapsed();
        Ok(stopped)
    }

    /// Seize the threads of the process not traced yet; how many.
    fn seize_new(&mut self) -> Result<usize, ProcessError> {
        let mut known: Vec<i32> = self.threads.iter().map(|t| t.traced.tid()).collect();
        known.sort_unstable();
        let before = self.threads.len();
        for tid in threads::tids(self.pid)? {
            if known.binary_search(&tid).is_ok() {
                continue;
            }
            match Traced::seize(self.pid, tid) {
                Ok(traced) => self.threads.push(Thread { traced, regs: None }),
                // It exited between the listing and the seize.
                Err(ProcessError::NoSuchThread { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(self.threads.len() - before)
    }

    /// Wait until every thread asked to stop is stopped, taking the stops
    /// in the order they come (one `waitpid` per thread and look, naps only
    /// when a look over every waiting thread found none) and reading each
    /// one's registers as it stops; threads that exited meanwhile are
    /// dropped from the set.
    fn collect(
        &mut self,
        start: Instant,
        timeout: Duration,
        observer: &mut Observer,
    ) -> Result<(), ProcessError> {
        let mut pending: Vec<usize> = (0..self.threads.len())
            .filter(|&i| !self.threads[i].traced.is_stopped())
            .collect();
        let mut backoff = Backoff::new(WAIT_NAP_MAX);
        let mut batch = Vec::new();
        while !pending.is_empty() {
            let before = pending.len();
            let mut failed = None;
            batch.clear();
            pending.retain(|&i| {
                if failed.is_some() {
                    return true;
                }
                let t = &mut self.threads[i];
                let regs = t.traced.poll_stop().and_then(|stopped| match stopped {
                    true => t.traced.regs().map(Some),
                    false => Ok(None),
                });
                match regs {
                    Ok(Some(regs)) => {
                        t.regs = Some(regs);
                        batch.push((t.traced.tid(), regs));
                        false
                    }
                    Ok(None) => true,
                    Err(ProcessError::Exited { .. }) | Err(ProcessError::NoSuchThread { .. }) => false,
                    Err(e) => {
                        failed = Some(e);
                        true
                    }
                }
            });
            if let Some(e) = failed {
                return Err(e);
            }
            if !batch.is_empty() {
                observer(&batch)?;
            }
            if pending.len() == before {
                if start.elapsed() > timeout {
                    let tid = self.threads[pending[0]].traced.tid();
                    return Err(ProcessError::Timeout {
                        pid: self.pid,
                        tid,
                        what: format!(
                            "waiting for {} of {} threads to stop",
                            pending.len(),
                            self.threads.len()
                        ),
                        after: timeout,
                    });
                }
                backoff.pause();
            }
        }
        self.threads.retain(|t| t.traced.is_attached());
        Ok(())
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// `(tid, rip)` of every stopped thread.
    pub fn rips(&self) -> Result<Vec<(i32, u64)>, ProcessError> {
        Ok(self
            .registers()?
            .into_iter()
            .map(|(tid, r)| (tid, r.rip))
            .collect())
    }

    /// `(tid, registers)` of every stopped thread.
    pub fn registers(&self) -> Result<Vec<(i32, Regs)>, ProcessError> {
        let mut out = Vec::with_capacity(self.threads.len());
        for t in &self.threads {
            let regs = match t.regs {
                Some(r) => Ok(r),
                None => t.traced.regs(),
            };
            match regs {
                Ok(r) => out.push((t.traced.tid(), r)),
                Err(ProcessError::Exited { .. }) | Err(ProcessError::NoSuchThread { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Single-step thread `tid` by one instruction while every other
    /// thread stays stopped (see [`Traced::step`]); its registers after.
    pub fn step(&mut self, tid: i32, timeout: Duration) -> Result<Regs, ProcessError> {
        let pid = self.pid;
        let thread = self
            .threads
            .iter_mut()
            .find(|t| t.traced.tid() == tid)
            .ok_or(ProcessError::NoSuchThread { pid, tid })?;
        thread.regs = None;
        thread.traced.step(timeout)?;
        let regs = thread.traced.regs()?;
        thread.regs = Some(regs);
        Ok(regs)
    }

    /// Resume every thread now (dropping does the same).
    pub fn resume(self) {}
}
