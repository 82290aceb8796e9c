//! The threads of a process (`/proc/PID/task`), their state, and which one
//! should run a remote call.

use super::ProcessError;
use std::path::PathBuf;

/// What `/proc/PID/task/TID/syscall` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyscallState {
    /// The thread is on a CPU (or runnable): the kernel cannot say.
    Running,
    /// Blocked, not in a system call (a page fault, a ptrace stop…).
    Blocked { sp: u64, pc: u64 },
    /// Blocked in system call `nr`; `pc` is just after its `syscall`.
    InSyscall { nr: u64, sp: u64, pc: u64 },
    /// The file could not be read or parsed.
    Unknown,
}

impl SyscallState {
    /// The user-mode `pc` of a blocked thread.
    pub fn pc(&self) -> Option<u64> {
        match *self {
            SyscallState::Blocked { pc, .. } | SyscallState::InSyscall { pc, .. } => Some(pc),
            _ => None,
        }
    }
}

/// One thread of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadInfo {
    pub tid: i32,
    /// The state letter of `/proc/PID/task/TID/stat`: `R`, `S`, `D`, `T`,
    /// `t`, `Z`, `X`, `I`…
    pub state: char,
    pub syscall: SyscallState,
}

/// System calls that the kernel restarts transparently after a ptrace
/// interrupt (they return `-ERESTART*`), so hijacking a thread blocked in one
/// is invisible to the program. Others (`epoll_wait`, `semop`, `sigtimedwait`…)
/// return `EINTR` to the program, which well-written code retries.
const RESTARTABLE: &[u64] = &[
    0,   // read
    1,   // write
    7,   // poll
    17,  // pread64
    18,  // pwrite64
    19,  // readv
    20,  // writev
    23,  // select
    34,  // pause
    35,  // nanosleep
    42,  // connect
    43,  // accept
    44,  // sendto
    45,  // recvfrom
    46,  // sendmsg
    47,  // recvmsg
    61,  // wait4
    72,  // fcntl (F_SETLKW)
    130, // rt_sigsuspend
    73,  // flock
    202, // futex
    230, // clock_nanosleep
    247, // waitid
    270, // pselect6
    271, // ppoll
    288, // accept4
];

/// Waits of a thread with nothing to do: the call costs the program nothing.
const IDLE: &[u64] = &[
    34,  // pause
    61,  // wait4
    130, // rt_sigsuspend
    247, // waitid
];

/// Timed sleeps: a periodic thread whose deadline falls during the call
/// wakes late by the call's length.
const TIMERS: &[u64] = &[
    35,  // nanosleep
    230, // clock_nanosleep
];

impl ThreadInfo {
    /// How suitable the thread is for a remote call; lower is better,
    /// `None` means never (stopped, traced, dead). Idle waits first, then
    /// other restartable waits (the event they wait for is delayed by the
    /// call), then timed sleeps, then waits that would see `EINTR`.
    pub fn rank(&self) -> Option<u8> {
        match self.state {
            'S' => match self.syscall {
                SyscallState::InSyscall { nr, .. } if IDLE.contains(&nr) => Some(0),
                SyscallState::InSyscall { nr, .. } if TIMERS.contains(&nr) => Some(2),
                SyscallState::InSyscall { nr, .. } if RESTARTABLE.contains(&nr) => Some(1),
                SyscallState::InSyscall { .. } => Some(3),
                _ => Some(4),
            },
            'R' => Some(5),
            // Uninterruptible sleep: the interrupt only lands when it ends.
            'D' => Some(6),
            _ => None,
        }
    }

    /// Whether the thread is stopped (job control or a ptrace stop).
    pub fn is_stopped(&self) -> bool {
        matches!(self.state, 'T' | 't')
    }
}

/// Parse the text of `/proc/PID/task/TID/stat`: the state letter after the
/// parenthesised `comm` (which may itself contain spaces and parentheses).
pub fn parse_stat_state(text: &str) -> Option<char> {
    let after = &text[text.rfind(')')? + 1..];
    after.split_whitespace().next()?.chars().next()
}

/// Parse the thread count (`num_threads`, field 20) of the text of
/// `/proc/PID/stat`.
pub fn parse_stat_threads(text: &str) -> Option<usize> {
    let after = &text[text.rfind(')')? + 1..];
    // Fields 3 (state) … 20 (num_threads) follow the `comm`.
    after.split_whitespace().nth(17)?.parse().ok()
}

/// How many threads process `pid` has (its `/proc/PID/stat`: one small
/// read, no listing). Threads that exited but are not reaped yet count.
pub fn count(pid: i32) -> Result<usize, ProcessError> {
    let path = PathBuf::from(format!("/proc/{pid}/stat"));
    let text = std::fs::read_to_string(&path).map_err(|e| ProcessError::from_io(pid, path.clone(), e))?;
    parse_stat_threads(&text).ok_or_else(|| ProcessError::Io {
        pid,
        path,
        error: std::io::Error::new(std::io::ErrorKind::InvalidData, "no num_threads field"),
    })
}

/// Parse the text of `/proc/PID/task/TID/syscall`.
pub fn parse_syscall(text: &str) -> SyscallState {
    let text = text.trim();
    if text == "running" {
        return SyscallState::Running;
    }
    let fields: Vec<&str> = text.split_whitespace().collect();
    let num = |s: &str| -> Option<u64> {
        match s.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).ok(),
            None => s.parse::<i64>().ok().map(|v| v as u64),
        }
    };
    let parsed = match fields.as_slice() {
        ["-1", sp, pc] => num(sp)
            .zip(num(pc))
            .map(|(sp, pc)| SyscallState::Blocked { sp, pc }),
        [nr, _, _, _, _, _, _, sp, pc] => num(nr)
            .zip(num(sp))
            .zip(num(pc))
            .map(|((nr, sp), pc)| SyscallState::InSyscall { nr, sp, pc }),
        _ => None,
    };
    parsed.unwrap_or(SyscallState::Unknown)
}

fn task_path(pid: i32, tid: i32, file: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/task/{tid}/{file}"))
}

/// Whether thread `tid` of `pid` still exists (and is not a zombie).
pub fn thread_exists(pid: i32, tid: i32) -> bool {
    std::fs::read_to_string(task_path(pid, tid, "stat"))
        .ok()
        .and_then(|s| parse_stat_state(&s))
        .is_some_and(|c| c != 'Z' && c != 'X')
}

/// The state of one thread, now.
pub fn thread_info(pid: i32, tid: i32) -> Result<ThreadInfo, ProcessError> {
    let path = task_path(pid, tid, "stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ProcessError::NoSuchThread { pid, tid },
        _ => ProcessError::from_io(pid, path.clone(), e),
    })?;
    let state = parse_stat_state(&stat).ok_or_else(|| ProcessError::Io {
        pid,
        path: path.clone(),
        error: std::io::Error::new(std::io::ErrorKind::InvalidData, "no state field"),
    })?;
    let syscall = std::fs::read_to_string(task_path(pid, tid, "syscall"))
        .map(|t| parse_syscall(&t))
        .unwrap_or(SyscallState::Unknown);
    Ok(ThreadInfo { tid, state, syscall })
}

/// The thread ids of `pid`, sorted: one directory read, no thread's files.
pub fn tids(pid: i32) -> Result<Vec<i32>, ProcessError> {
    let dir = PathBuf::from(format!("/proc/{pid}/task"));
    let entries = std::fs::read_dir(&dir).map_err(|e| ProcessError::from_io(pid, dir.clone(), e))?;
    let mut tids: Vec<i32> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect();
    tids.sort_unstable();
    Ok(tids)
}

/// Every thread of `pid`, in tid order. Threads that exit while we look are
/// left out.
pub fn threads(pid: i32) -> Result<Vec<ThreadInfo>, ProcessError> {
    let tids = tids(pid)?;
    let mut out = Vec::with_capacity(tids.len());
    for tid in tids {
        match thread_info(pid, tid) {
            Ok(t) => out.push(t),
            Err(ProcessError::NoSuchThread { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    if out.is_empty() {
        return Err(ProcessError::NoSuchProcess { pid });
    }
    Ok(out)
}

/// A good thread for a remote call without reading every thread's files:
/// the thread ids (one directory read), then, from a place chosen by
/// `seed`, one thread at a time until one waits in a restartable call
/// (rank 0 or 1) — else the best of all. Cost independent of the thread
/// count in a server whose threads mostly wait; in one whose threads all
/// run, every thread is looked at, which costs far less than taking a
/// running thread: among N busy threads it reaches its stop only when
/// its turn on a CPU comes (1.5 s measured among 499 busy threads on 2
/// cores, against 15 ms to read every thread's files).
/// Threads in `excluded` are skipped; `None` if no usable thread was seen.
pub fn sample(pid: i32, seed: u64, excluded: &[i32]) -> Result<Option<ThreadInfo>, ProcessError> {
    let mut tids = tids(pid)?;
    tids.retain(|t| !excluded.contains(t));
    if tids.is_empty() {
        return Ok(None);
    }
    let start = (seed % tids.len() as u64) as usize;
    let order = tids[start..].iter().chain(&tids[..start]);
    let mut seen = Vec::new();
    for &tid in order {
        match thread_info(pid, tid) {
            Ok(t) if t.rank().is_some_and(|r| r <= 1) => return Ok(Some(t)),
            Ok(t) => seen.push(t),
            Err(ProcessError::NoSuchThread { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(pick(&seen).cloned())
}

/// The best thread for a remote call (see [`ThreadInfo::rank`]); ties go to
/// the lowest tid. Fails when every thread is stopped or dead.
pub fn choose_thread(pid: i32) -> Result<ThreadInfo, ProcessError> {
    let all = threads(pid)?;
    pick(&all).cloned().ok_or_else(|| ProcessError::NoUsableThread {
        pid,
        why: format!(
            "every thread is stopped or exiting (states: {})",
            all.iter()
                .map(|t| format!("{}={}", t.tid, t.state))
                .collect::<Vec<_>>()
                .join(" ")
        ),
    })
}

/// The pure part of [`choose_thread`].
pub fn pick(threads: &[ThreadInfo]) -> Option<&ThreadInfo> {
    pick_rotating(threads, 0)
}

/// Like [`pick`], but the `turn`-th (modulo) of the equally good threads,
/// so that successive calls spread over them.
pub fn pick_rotating(threads: &[ThreadInfo], turn: usize) -> Option<&ThreadInfo> {
    if threads.iter().any(ThreadInfo::is_stopped) {
        // A process in group stop (SIGSTOP) must stay stopped; a thread
        // already in a ptrace stop belongs to another tracer.
        let all_stopped = threads.iter().all(|t| t.is_stopped() || t.rank().is_none());
        if all_stopped {
            return None;
        }
    }
    let best = threads.iter().filter_map(ThreadInfo::rank).min()?;
    let mut equal: Vec<&ThreadInfo> = threads.iter().filter(|t| t.rank() == Some(best)).collect();
    equal.sort_by_key(|t| t.tid);
    Some(equal[turn % equal.len()])
}

/// Why no thread of process `pid` (its threads `all`) could run a remote
/// call, from their states.
pub fn why_none_usable(pid: i32, all: &[ThreadInfo]) -> String {
    let live: Vec<&ThreadInfo> = all.iter().filter(|t| !matches!(t.state, 'Z' | 'X')).collect();
    if live.is_empty() {
        return "every thread has exited".into();
    }
    if live.iter().all(|t| t.state == 'T') {
        return format!(
            "the process is stopped by a signal (job control, state T); `kill -CONT {pid}` resumes it"
        );
    }
    if live.iter().all(|t| t.is_stopped()) {
        return "its threads are stopped by a debugger or tracer (state t): detach it first".into();
    }
    "no running or sleeping thread could be interrupted with a usable stack".into()
}

/// Like [`pick`], but spread over the equally good threads: the one
/// `seed` chooses. (A fixed rotation, or always avoiding the last thread,
/// locks a caller whose calls come in a fixed period onto one thread.)
pub fn pick_spread(threads: &[ThreadInfo], seed: u64) -> Option<&ThreadInfo> {
    let best = pick(threads)?.rank();
    let equal: Vec<&ThreadInfo> = threads.iter().filter(|t| t.rank() == best).collect();
    Some(equal[(seed % equal.len() as u64) as usize])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat() {
        assert_eq!(parse_stat_state("123 (a b) c) S 1 2 3"), Some('S'));
        assert_eq!(parse_stat_state("1 (x) t 0"), Some('t'));
        assert_eq!(parse_stat_state("garbage"), None);
    }

    #[test]
    fn parses_stat_thread_count() {
        let stat = "4242 (a) b) c) S 1 4242 4242 0 -1 4194560 123 0 0 0 5 6 0 0 20 0 17 0 999 1 2";
        assert_eq!(parse_stat_threads(stat), Some(17));
        assert_eq!(parse_stat_threads("1 (x) S 0 1"), None);
        assert_eq!(parse_stat_threads("garbage"), None);
        assert!(count(std::process::id() as i32).unwrap() >= 1);
    }

    #[test]
    fn parses_syscall() {
        assert_eq!(parse_syscall("running\n"), SyscallState::Running);
        assert_eq!(
            parse_syscall("-1 0x7ffc1000 0x401000\n"),
            SyscallState::Blocked {
                sp: 0x7ffc1000,
                pc: 0x401000
            }
        );
        assert_eq!(
            parse_syscall("202 0x1 0x2 0x3 0x4 0x5 0x6 0x7ffd0 0x7f0010\n"),
            SyscallState::InSyscall {
                nr: 202,
                sp: 0x7ffd0,
                pc: 0x7f0010
            }
        );
        assert_eq!(parse_syscall("1 2"), SyscallState::Unknown);
    }

    fn t(tid: i32, state: char, syscall: SyscallState) -> ThreadInfo {
        ThreadInfo { tid, state, syscall }
    }

    #[test]
    fn prefers_restartable_sleepers() {
        let epoll = SyscallState::InSyscall {
            nr: 232,
            sp: 0,
            pc: 0,
        };
        let read = SyscallState::InSyscall { nr: 0, sp: 0, pc: 0 };
        let all = [
            t(1, 'R', SyscallState::Running),
            t(2, 'S', epoll),
            t(3, 'S', read),
            t(4, 'Z', SyscallState::Unknown),
        ];
        assert_eq!(pick(&all).map(|t| t.tid), Some(3));
        assert_eq!(pick(&all[..2]).map(|t| t.tid), Some(2));
        assert_eq!(pick(&all[..1]).map(|t| t.tid), Some(1));
        assert_eq!(pick(&all[3..]), None);
        let two = [t(5, 'S', read), t(4, 'S', read), t(6, 'R', SyscallState::Running)];
        assert_eq!(pick_rotating(&two, 0).map(|t| t.tid), Some(4));
        assert_eq!(pick_rotating(&two, 1).map(|t| t.tid), Some(5));
        assert_eq!(pick_rotating(&two, 2).map(|t| t.tid), Some(4));
    }

    #[test]
    fn prefers_idle_threads_and_spares_timers() {
        let sys = |nr| SyscallState::InSyscall { nr, sp: 0, pc: 0 };
        let pause = t(1, 'S', sys(34));
        let read = t(2, 'S', sys(0));
        let clock = t(3, 'S', sys(230));
        let epoll = t(4, 'S', sys(232));
        let all = [epoll.clone(), clock.clone(), read.clone(), pause];
        assert_eq!(pick(&all).map(|t| t.tid), Some(1), "an idle pause() first");
        assert_eq!(
            pick(&all[..3]).map(|t| t.tid),
            Some(2),
            "a restartable wait before a timer"
        );
        assert_eq!(
            pick(&all[..2]).map(|t| t.tid),
            Some(3),
            "a timer before an EINTR wait"
        );
        assert_eq!(pick(&all[..1]).map(|t| t.tid), Some(4));
    }

    #[test]
    fn spreads_over_equal_threads() {
        let read = SyscallState::InSyscall { nr: 0, sp: 0, pc: 0 };
        let all = [
            t(4, 'S', read),
            t(5, 'S', read),
            t(6, 'S', read),
            t(7, 'R', SyscallState::Running),
        ];
        let seen: std::collections::BTreeSet<_> = (0..64)
            .map(|seed| pick_spread(&all, seed).map(|t| t.tid))
            .collect();
        assert_eq!(seen, [Some(4), Some(5), Some(6)].into_iter().collect());
        // A better rank wins; stopped processes get nothing.
        assert_eq!(pick_spread(&all[2..], 1).map(|t| t.tid), Some(6));
        let stopped = [t(1, 'T', SyscallState::Unknown)];
        assert_eq!(pick_spread(&stopped, 0), None);
    }

    #[test]
    fn samples_a_waiting_thread_and_skips_excluded_ones() {
        // Threads of this process blocked in read(2) on pipes: a
        // restartable wait, what the sample stops at.
        let pid = std::process::id() as i32;
        let mut pipes = Vec::new();
        let mut handles = Vec::new();
        for _ in 0..4 {
            let (r, w) = std::io::pipe().unwrap();
            handles.push(std::thread::spawn(move || {
                use std::io::Read;
                let mut r = r;
                let mut b = [0u8; 1];
                let _ = r.read(&mut b);
            }));
            pipes.push(w);
        }
        let blocked = |t: &ThreadInfo| matches!(t.syscall, SyscallState::InSyscall { nr: 0, .. });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while threads(pid).unwrap().iter().filter(|t| blocked(t)).count() < 4 {
            assert!(std::time::Instant::now() < deadline, "threads never blocked");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let mut chosen = std::collections::BTreeSet::new();
        for seed in 0..64 {
            let t = sample(pid, seed, &[]).unwrap().expect("a thread");
            assert!(t.rank().is_some_and(|r| r <= 1) || !threads(pid).unwrap().iter().any(blocked));
            chosen.insert(t.tid);
        }
        assert!(chosen.len() >= 2, "the seed spreads the choice: {chosen:?}");
        // (Other tests' threads come and go meanwhile.)
        let now = threads(pid).unwrap();
        let all: Vec<i32> = now.iter().map(|t| t.tid).collect();
        let keep = now.iter().find(|t| blocked(t)).expect("a blocked thread").tid;
        let excluded: Vec<i32> = all.iter().copied().filter(|&t| t != keep).collect();
        for seed in 0..8 {
            let t = sample(pid, seed, &excluded).unwrap().expect("a thread");
            assert!(t.tid == keep || !all.contains(&t.tid), "{t:?}");
        }
        if let Some(t) = sample(pid, 0, &all).unwrap() {
            assert!(!all.contains(&t.tid), "an excluded thread: {t:?}");
        }
        drop(pipes);
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn says_why_no_thread_is_usable() {
        let stopped = [t(7, 'T', SyscallState::Unknown), t(8, 'T', SyscallState::Unknown)];
        assert!(why_none_usable(7, &stopped).contains("kill -CONT 7"));
        let traced = [t(7, 't', SyscallState::Unknown), t(8, 'T', SyscallState::Unknown)];
        assert!(why_none_usable(7, &traced).contains("debugger"));
        let gone = [t(7, 'Z', SyscallState::Unknown)];
        assert!(why_none_usable(7, &gone).contains("exited"));
        let odd = [t(7, 'S', SyscallState::Unknown)];
        assert!(why_none_usable(7, &odd).contains("usable stack"));
    }

    #[test]
    fn never_picks_stopped() {
        let all = [t(1, 'T', SyscallState::Unknown), t(2, 'T', SyscallState::Unknown)];
        assert_eq!(pick(&all), None);
        let all = [t(1, 't', SyscallState::Unknown), t(2, 'R', SyscallState::Running)];
        assert_eq!(pick(&all).map(|t| t.tid), Some(2));
    }

    #[test]
    fn lists_own_threads() {
        let me = std::process::id() as i32;
        let all = threads(me).unwrap();
        assert!(all.iter().any(|t| t.tid == me));
    }
}
