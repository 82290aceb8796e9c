//! The guardian: a small child process that gives back the priorities the
//! tool lent to target threads if the tool dies before it could.
//!
//! An [`super::EarlyLoan`] raises a target thread before that thread is in
//! a ptrace stop, so nothing in the target can undo it yet; a tool killed
//! with `SIGKILL` at that moment would leave a server thread at
//! `SCHED_FIFO` for good. The guardian is forked (not executed: it runs
//! only raw system calls, no allocation, which is sound in the child of a
//! multi-threaded process) once per tool process, in a session of its own
//! (terminal and process-group signals do not reach it), with its standard
//! files on `/dev/null` and every other descriptor closed but its end of a
//! `SOCK_SEQPACKET` pair. The tool tells it of each loan before making it
//! and of its end after; when the tool's end closes — the tool exited or
//! was killed — it restores every loan still open whose thread is still at
//! the priority lent, and exits.
//!
//! What it cannot survive is being killed with the tool (a whole cgroup
//! killed at once): the README says so.

use super::{SchedAttr, sched_getattr, sched_setattr};
use nix::libc;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

/// One message: what happened to one thread's loan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    op: u32,
    tid: i32,
    attr: SchedAttr,
}

const LENT: u32 = 1;
const ENDED: u32 = 2;
const RECORD: usize = 64;
/// Loans the guardian keeps at once (a tool lends one at a time).
const OPEN_MAX: usize = 32;

impl Record {
    /// `tid` is about to be raised; `own` is what to give back.
    pub fn lent(tid: i32, own: &SchedAttr) -> Record {
        Record {
            op: LENT,
            tid,
            attr: *own,
        }
    }

    /// The loan of `tid` is over (given back, or held by a program).
    pub fn ended(tid: i32) -> Record {
        Record {
            op: ENDED,
            tid,
            attr: SchedAttr::default(),
        }
    }

    fn bytes(&self) -> [u8; RECORD] {
        let mut b = [0u8; RECORD];
        b[0..4].copy_from_slice(&self.op.to_le_bytes());
        b[4..8].copy_from_slice(&self.tid.to_le_bytes());
        b[8..64].copy_from_slice(&self.attr.bytes());
        b
    }

    fn parse(b: &[u8; RECORD]) -> Record {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        Record {
            op: u32_at(0),
            tid: u32_at(4) as i32,
            attr: SchedAttr {
                size: u32_at(8),
                policy: u32_at(12),
                flags: u64_at(16),
                nice: u32_at(24) as i32,
                priority: u32_at(28),
                runtime: u64_at(32),
                deadline: u64_at(40),
                period: u64_at(48),
                util_min: u32_at(56),
                util_max: u32_at(60),
            },
        }
    }
}

/// The loans still open, as the guardian tracks them (pure).
#[derive(Debug, Default)]
struct Open {
    loans: [Option<(i32, SchedAttr)>; OPEN_MAX],
}

impl Open {
    fn apply(&mut self, r: &Record) {
        match r.op {
            LENT => {
                let same = self
                    .loans
                    .iter()
                    .position(|l| l.is_some_and(|(tid, _)| tid == r.tid));
                let at = same.or_else(|| self.loans.iter().position(Option::is_none));
                if let Some(i) = at {
                    self.loans[i] = Some((r.tid, r.attr));
                }
            }
            ENDED => {
                for l in self.loans.iter_mut() {
                    if l.is_some_and(|(tid, _)| tid == r.tid) {
                        *l = None;
                    }
                }
            }
            _ => {}
        }
    }
}

/// The tool's end of the guardian's socket, once spawned.
static GUARDIAN: Mutex<Option<OwnedFd>> = Mutex::new(None);

/// Tell the guardian `r`, spawning it first if needed. An error means the
/// guardian cannot be relied on: make no loan.
pub fn record(r: Record) -> std::io::Result<()> {
    let mut g = GUARDIAN.lock().unwrap_or_else(|e| e.into_inner());
    if g.is_none() {
        *g = Some(spawn()?);
    }
    let Some(fd) = g.as_ref() else {
        return Err(std::io::Error::other("no guardian"));
    };
    let b = r.bytes();
    // SAFETY: sends `RECORD` bytes from `b`, which lives on this frame;
    // MSG_NOSIGNAL: a dead guardian is an error here, never a SIGPIPE.
    let n = unsafe { libc::send(fd.as_raw_fd(), b.as_ptr().cast(), RECORD, libc::MSG_NOSIGNAL) };
    if n == RECORD as isize {
        return Ok(());
    }
    let e = if n < 0 {
        std::io::Error::last_os_error()
    } else {
        std::io::Error::other("short send")
    };
    // A guardian that is gone is spawned again for the next loan.
    *g = None;
    Err(e)
}

fn spawn() -> std::io::Result<OwnedFd> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: socketpair writes two descriptors into `fds`, on this frame.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned here only.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fork in a process that may have other threads: the child
    // runs `guard`, which makes raw system calls only (no allocation, no
    // lock), and never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        guard(theirs.as_raw_fd(), ours.as_raw_fd());
    }
    drop(theirs);
    // At the tool's real-time priority (it was born without it: reset on
    // fork), so that neither its start nor its work when the tool dies
    // waits for a CPU behind the target's busy threads. Best effort.
    let fifo = libc::sched_param { sched_priority: 1 };
    // SAFETY: sets the policy of our own child; `fifo` lives on this frame.
    unsafe { libc::sched_setscheduler(pid, libc::SCHED_FIFO, &fifo) };
    // Until the guardian has closed the copies of the tool's descriptors
    // it was born with, it holds the tool's locks too: wait for its word
    // (a tool that let go of a process's lock meanwhile would leave the
    // lock held by the guardian).
    let mut poll = libc::pollfd {
        fd: ours.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one descriptor we own, described on this frame.
    let ready = unsafe { libc::poll(&mut poll, 1, READY_WAIT_MS) };
    let mut word = [0u8; 1];
    // SAFETY: receives at most 1 byte into `word`, on this frame.
    let got = (ready == 1).then(|| unsafe { libc::recv(ours.as_raw_fd(), word.as_mut_ptr().cast(), 1, 0) });
    if got != Some(1) || word[0] != READY {
        // SAFETY: kill and reap our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        return Err(std::io::Error::other("the priority guardian did not start"));
    }
    tracing::debug!(guardian = pid, "priority guardian started");
    Ok(ours)
}

/// What the guardian says once it holds nothing of the tool's.
const READY: u8 = b'r';
const READY_WAIT_MS: libc::c_int = 2000;

/// The guardian's life: only raw system calls from here.
fn guard(fd: libc::c_int, tools_end: libc::c_int) -> ! {
    // SAFETY (the whole function): async-signal-safe system calls on
    // descriptors this child owns and buffers on its own stack.
    unsafe {
        libc::close(tools_end);
        libc::setsid();
        for sig in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGPIPE,
            libc::SIGTSTP,
            libc::SIGTTIN,
            libc::SIGTTOU,
            libc::SIGUSR1,
            libc::SIGUSR2,
        ] {
            libc::signal(sig, libc::SIG_IGN);
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for std_fd in 0..3 {
                libc::dup2(null, std_fd);
            }
        }
        // Keep only our end (as fd 3): no lock, pipe or target memory the
        // tool holds stays open in here.
        let ours = 3;
        if fd != ours && libc::dup2(fd, ours) != ours {
            libc::_exit(1);
        }
        if libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32) != 0 {
            libc::_exit(1);
        }
        let ready = [READY];
        if libc::send(ours, ready.as_ptr().cast(), 1, libc::MSG_NOSIGNAL) != 1 {
            libc::_exit(1);
        }
        let mut open = Open::default();
        let mut buf = [0u8; RECORD];
        loop {
            let n = libc::recv(ours, buf.as_mut_ptr().cast(), RECORD, 0);
            if n == RECORD as isize {
                open.apply(&Record::parse(&buf));
                continue;
            }
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            break;
        }
        // The tool is gone: give back what it still owed.
        for (tid, own) in open.loans.iter().flatten() {
            if sched_getattr(*tid).is_ok_and(|a| a.policy == libc::SCHED_FIFO as u32 && a.priority == 1) {
                let _ = sched_setattr(*tid, own);
            }
        }
        libc::_exit(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(nice: i32) -> SchedAttr {
        SchedAttr {
            size: 56,
            nice,
            util_max: 1024,
            ..SchedAttr::default()
        }
    }

    #[test]
    fn records_round_trip() {
        for r in [Record::lent(42, &attr(-5)), Record::ended(7)] {
            assert_eq!(Record::parse(&r.bytes()), r);
        }
    }

    #[test]
    fn open_loans_follow_lent_and_ended() {
        let mut open = Open::default();
        open.apply(&Record::lent(1, &attr(1)));
        open.apply(&Record::lent(2, &attr(2)));
        open.apply(&Record::ended(1));
        open.apply(&Record::lent(2, &attr(3)));
        let left: Vec<_> = open.loans.iter().flatten().collect();
        assert_eq!(left, vec![&(2, attr(3))]);
        open.apply(&Record::ended(2));
        assert!(open.loans.iter().all(Option::is_none));
        // Unknown operations change nothing.
        open.apply(&Record {
            op: 9,
            tid: 5,
            attr: attr(0),
        });
        assert!(open.loans.iter().all(Option::is_none));
    }
}
