//! One trip: a [`Program`] run by one hijacked thread, driven by the tool
//! through its rendezvous points (see [`crate::process::program`]).
//!
//! The program's code goes into the call region's code page after the
//! session stub, its data block into the region's scratch area; the stub
//! calls it like any function, so everything the stub guarantees holds:
//! the thread resumes exactly where it was, whatever happens to the tool.
//! A tool killed while the thread waits at a rendezvous leaves it
//! sleeping until the program's deadline; a later tool that finds the
//! region so (it holds the region's lock, so the first tool is gone)
//! cancels the wait at once (see `adopt`).

use super::Remote;
use crate::process::ProcessError;
use crate::process::program::{self, Program, Status, Step, data};
use crate::process::ptrace::Backoff;
use crate::process::stub;
use std::time::{Duration, Instant};

/// Where a program's code starts in the code page (after the stub).
pub const PROGRAM_OFFSET: u64 = 0x400;
/// How long a program waits for the tool at its rendezvous points, in all,
/// before it gives up and returns (a tool that died, or stalled).
pub const BUDGET: Duration = Duration::from_secs(2);
/// How long it sleeps between two looks at the tool's answer.
pub const NAP: Duration = Duration::from_micros(20);

/// The free part of the data block, handed out front to back for the
/// strings and tables a program uses. Written before the program starts
/// (or, for a table, before the rendezvous that precedes its use).
#[derive(Debug)]
pub struct ProgramData {
    next: u64,
    end: u64,
}

impl ProgramData {
    /// `len` bytes (8-aligned); `None` when they do not fit.
    pub fn take(&mut self, len: u64) -> Option<u64> {
        let at = self.next;
        let next = at.checked_add(len.next_multiple_of(8))?;
        if next > self.end {
            return None;
        }
        self.next = next;
        Some(at)
    }
}

/// A program running in the target. Holds the session: no other call can
/// use the frame until it is over ([`Running::finish`]).
#[derive(Debug)]
pub struct Running<'r> {
    remote: &'r mut Remote,
    tid: i32,
    data_at: u64,
    started: Instant,
}

impl Remote {
    /// Wait for the thread of the last program to be done with the stub
    /// (see [`Running::finish`]) before anything of the region is
    /// written again; a thread that never gets there poisons the session.
    pub(super) fn settle_or_fail(&mut self) -> Result<(), ProcessError> {
        if let Some(tid) = self.pending.take() {
            self.wait_done(tid, "waiting for the last program's thread to leave the stub")?;
        }
        Ok(())
    }

    fn settle(&mut self) {
        if let Err(e) = self.settle_or_fail() {
            tracing::warn!(pid = self.pid, "{e}");
        }
    }

    /// A new program for this session: it starts by naming a region this
    /// session made (that costs no trip of its own).
    pub fn program(&mut self) -> (Program, ProgramData) {
        self.settle();
        let mut p = Program::new();
        if self.unnamed
            && let Ok(at) = self.write_region_name()
        {
            self.unnamed = false;
            let args = self.name_args(at).map(program::Arg::Imm);
            p.syscall(super::NR_PRCTL, &args, program::Check::None);
        }
        (p, self.program_data())
    }

    /// The result of `step` of the last program this session ran (valid
    /// once it has returned, until the next trip).
    pub fn program_result(&self, step: Step) -> Result<u64, ProcessError> {
        self.mem
            .read_u64(self.layout.scratch() + data::RESULTS + 8 * step.0 as u64)
    }

    fn program_data(&self) -> ProgramData {
        let base = self.layout.scratch();
        ProgramData {
            next: base + data::FREE,
            end: base + stub::SCRATCH_SIZE,
        }
    }

    /// Start `program` on one thread: its data block's header, its code,
    /// then one remote call. The rest of the data block (strings, tables)
    /// must be written already.
    pub fn start(&mut self, program: &Program) -> Result<Running<'_>, ProcessError> {
        let pid = self.pid;
        self.settle_or_fail()?;
        let code_at = self.layout.code() + PROGRAM_OFFSET;
        let data_at = self.layout.scratch();
        if self.stub.bytes.len() as u64 > PROGRAM_OFFSET {
            return Err(ProcessError::Unsupported {
                pid,
                what: format!(
                    "a {}-byte session stub leaves no room for programs",
                    self.stub.bytes.len()
                ),
            });
        }
        let mut program = program.clone();
        program.restore_scheduling(data_at + data::SCHED);
        let code = program
            .assemble(code_at, data_at, (stub::CODE_SIZE - PROGRAM_OFFSET) as usize)
            .map_err(|e| ProcessError::Unsupported {
                pid,
                what: format!("the program: {e}"),
            })?;
        self.mem.write(
            data_at,
            &program::header(BUDGET.as_nanos() as u64, NAP.as_nanos() as u64),
        )?;
        self.mem.write(code_at, &code)?;
        let started = Instant::now();
        let tid = self.launch(code_at, &[], 0, Some(data_at + data::SCHED))?;
        tracing::debug!(pid, tid, steps = program.len(), "program started");
        Ok(Running {
            remote: self,
            tid,
            data_at,
            started,
        })
    }
}

impl<'r> Running<'r> {
    /// The thread running the program.
    pub fn tid(&self) -> i32 {
        self.tid
    }

    pub(super) fn remote_mut(&mut self) -> &mut Remote {
        self.remote
    }

    /// The session (read-only while the program runs).
    pub fn remote(&self) -> &Remote {
        self.remote
    }

    /// The call region the program runs from.
    pub fn region(&self) -> std::ops::Range<u64> {
        self.remote.region()
    }

    pub fn status(&self) -> Result<Status, ProcessError> {
        let block = self.remote.mem.read(self.data_at, data::RESULTS as usize)?;
        Status::parse(&block).ok_or(ProcessError::Unsupported {
            pid: self.remote.pid,
            what: "a short read of the program's data block".into(),
        })
    }

    /// The result of `step`.
    pub fn result(&self, step: Step) -> Result<u64, ProcessError> {
        self.remote
            .mem
            .read_u64(self.data_at + data::RESULTS + 8 * step.0 as u64)
    }

    /// Write into the session's memory (a table the next phase reads).
    pub fn write(&self, at: u64, bytes: &[u8]) -> Result<(), ProcessError> {
        self.remote.mem.write(at, bytes)
    }

    /// Wait until the program waits at `phase` (`Ok(true)`) or has ended
    /// (`Ok(false)`: see [`Running::status`] for why).
    pub fn reach(&mut self, phase: u32) -> Result<bool, ProcessError> {
        let start = Instant::now();
        let what = format!("waiting for the program to reach its rendezvous {phase}");
        let s = self.wait_for(&what, |s| s.ended || s.phase >= phase)?;
        if !s.ended {
            tracing::trace!(
                pid = self.remote.pid,
                phase,
                waited_us = start.elapsed().as_micros() as u64,
                since_start_us = self.started.elapsed().as_micros() as u64,
                "program at its rendezvous"
            );
        }
        Ok(!s.ended)
    }

    /// Wait until the program has done all it will do (`ENDED`).
    fn wait_ended(&mut self) -> Result<Status, ProcessError> {
        self.wait_for("waiting for the program to return", |s| s.ended)
    }

    /// Poll the program's status until `done` says so; bounded by the
    /// session's call timeout (then the session is poisoned: the thread
    /// may still be in the program), and by the thread's existence.
    fn wait_for(&mut self, what: &str, done: impl Fn(&Status) -> bool) -> Result<Status, ProcessError> {
        let start = Instant::now();
        let mut backoff = Backoff::new(Duration::from_micros(200));
        loop {
            let s = self.status()?;
            if done(&s) {
                return Ok(s);
            }
            if start.elapsed() >= self.remote.timeouts.call {
                self.remote.poisoned = Some(format!("thread {} may still be running a program", self.tid));
                return Err(ProcessError::Timeout {
                    pid: self.remote.pid,
                    tid: self.tid,
                    what: what.to_string(),
                    after: self.remote.timeouts.call,
                });
            }
            if !crate::process::threads::thread_exists(self.remote.pid, self.tid) {
                return Err(self.remote.gone_or(
                    self.tid,
                    ProcessError::NoSuchThread {
                        pid: self.remote.pid,
                        tid: self.tid,
                    },
                    "during the program",
                ));
            }
            backoff.pause();
        }
    }

    /// Let the program go on past `phase`.
    pub fn go(&mut self, phase: u32) -> Result<(), ProcessError> {
        self.remote.mem.write_u32(self.data_at + data::GO, phase)
    }

    /// Stop the program at the rendezvous it waits at (or will reach
    /// next), and wait for it to return.
    pub fn abort(self) -> (Result<Status, ProcessError>, &'r mut Remote) {
        if let Err(e) = self.remote.mem.write_u32(self.data_at + data::GO, program::ABORT) {
            self.remote.poisoned = Some(format!("thread {} may still be running a program", self.tid));
            return (Err(e), self.remote);
        }
        self.finish()
    }

    /// Wait for the program to return and the thread to be done with the
    /// frame; the program's final status.
    /// The session is given back either way.
    pub fn finish(mut self) -> (Result<Status, ProcessError>, &'r mut Remote) {
        let status = self.wait_ended();
        // The thread may still be on its way out of the stub (giving back
        // its lent priority): the next use of the frame waits for it.
        self.remote.pending = Some(self.tid);
        tracing::debug!(
            pid = self.remote.pid,
            tid = self.tid,
            us = self.started.elapsed().as_micros() as u64,
            ?status,
            "program done"
        );
        (status, self.remote)
    }
}

/// Whether the data block at `data_at` holds a program waiting at a
/// rendezvous: then `GO` gets [`program::CANCEL`] so that it returns now.
/// Only for a region whose lock the caller holds (no tool drives it).
pub(super) fn cancel_waiting(mem: &crate::process::Mem, data_at: u64) -> bool {
    match last_status(mem, data_at) {
        Some(s) if !s.ended && s.phase > 0 => mem.write_u32(data_at + data::GO, program::CANCEL).is_ok(),
        _ => false,
    }
}

/// The status of the last program run in the data block at `data_at`, if
/// one ran there.
fn last_status(mem: &crate::process::Mem, data_at: u64) -> Option<Status> {
    let block = mem.read(data_at, data::RESULTS as usize).ok()?;
    let magic = block
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes);
    Status::parse(&block).filter(|_| magic == Some(program::MAGIC))
}

/// Whether the last program of the data block at `data_at` has ended: its
/// thread has only the stub's way out left (it gave back a lent priority
/// just before, and may wait for a CPU among busy threads to take it).
pub(super) fn program_ended(mem: &crate::process::Mem, data_at: u64) -> bool {
    last_status(mem, data_at).is_some_and(|s| s.ended)
}
