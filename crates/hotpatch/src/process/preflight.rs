//! Preflight: before the first write into a process, find what would make
//! an apply or a revert fail half-way or kill the process, and say why.
//!
//! Read from `/proc` (nothing is stopped): a kernel thread, a zombie, a
//! process whose main thread exited, the tool itself, a process stopped by
//! job control (`T`), a process traced by someone else (its tracer named),
//! CET shadow stacks, strict seccomp, no C library to `dlopen` with, and
//! whether ptrace will be allowed at all.
//!
//! Seccomp filters ([`Depth::Full`] only): every thread with filters is
//! stopped for a moment (`PTRACE_SEIZE` + `PTRACE_INTERRUPT`, never
//! `EXITKILL`; a restartable system call it was in restarts, others such as
//! `epoll_wait` return `EINTR`, as for any remote call) to read its
//! classic-BPF programs with `PTRACE_SECCOMP_GET_FILTER`, and is let go
//! again; then every system call the tool makes in a process ([`CALLS`]) —
//! the remote-call bootstrap, the state record, scratch pages, core
//! serialisation, and what `dlopen` does inside — is evaluated against
//! them ([`crate::seccomp`]). An answer other than `ALLOW`/`LOG` for a
//! call whose failure breaks the apply, or any answer that kills, traps or
//! waits for a supervisor, is a refusal naming the system call and the
//! answer — unless threads without a filter exist to make the calls
//! instead ([`Scope::PlainThreads`]).
//!
//! Filters, shadow stacks and tracers belong to threads, and the tool's
//! calls run on the one thread it sends into its stub. The engine's look
//! ([`Depth::Lean`]) reads the main thread's facts only when it is plain,
//! so that its cost does not grow with the thread count (each thread's
//! `status` costs 15–30 µs: 10 ms at 500 threads); a session then checks
//! each thread before it uses it and skips those that are not plain, and
//! before it would use one of those (none other usable) it judges every
//! thread as [`Depth::Full`] does. A detour's stop of every thread runs no
//! call in the process: a thread traced by someone else fails its
//! `PTRACE_SEIZE`, naming the tracer, and no entry is written.
//!
//! MDWE (`PR_SET_MDWE`) is not shown for another process by this kernel
//! (6.18 has no line for it in `/proc/PID/status`); the bootstrap finds it
//! when `mprotect(PROT_EXEC)` is refused, and unmaps what it mapped.

use super::ProcessError;
use super::ptrace::Traced;
use crate::seccomp::{self, Outcome, Program, Query};
use std::collections::BTreeMap;
use std::time::Duration;

/// How deep to look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Also read and evaluate seccomp filters (stops each filtered thread
    /// for a moment).
    Full,
    /// `/proc` only: nothing is stopped.
    Passive,
    /// As [`Depth::Full`] when the main thread has a seccomp filter, a
    /// shadow stack, a tracer or a stop; otherwise only the process's own
    /// files are read, not every thread's ([`Scope::PlainThreads`]): reading
    /// each thread's `status` costs 15–30 µs, 10 ms at 500 threads. What
    /// is left unread is checked for the one thread a remote call is about
    /// to use ([`thread_unfit`]).
    Lean,
}

/// Which threads may run the tool's calls, as far as a look judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// Any thread: every thread's facts were read (at [`Depth::Full`]
    /// every thread's filters too) and none stands in the way.
    #[default]
    EveryThread,
    /// Plain threads only (no seccomp, shadow stack, tracer or stop):
    /// either only the main thread was read (a [`Depth::Lean`] look found
    /// it plain), or some thread's filter refuses a call and plain threads
    /// exist to run them instead. A remote call session on such a look
    /// checks each thread before it uses it ([`thread_unfit`]) and looks
    /// at every thread again before it would use one that is not plain
    /// (`process::remote`).
    PlainThreads,
}

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Ok,
    /// Not decided (a passive look at something only a full look reads).
    Unknown,
    /// The process cannot be patched.
    Refuse,
}

/// The checks, in the order they are reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Check {
    Process,
    Stopped,
    Tracer,
    Ptrace,
    Cet,
    Seccomp,
    Mdwe,
    Libc,
}

impl Check {
    pub fn name(self) -> &'static str {
        match self {
            Check::Process => "process",
            Check::Stopped => "stopped",
            Check::Tracer => "tracer",
            Check::Ptrace => "ptrace",
            Check::Cet => "cet",
            Check::Seccomp => "seccomp",
            Check::Mdwe => "mdwe",
            Check::Libc => "libc",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    pub check: Check,
    pub verdict: Verdict,
    pub detail: String,
}

fn finding(check: Check, verdict: Verdict, detail: impl Into<String>) -> Finding {
    Finding {
        check,
        verdict,
        detail: detail.into(),
    }
}

/// Every check for one process.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub pid: i32,
    pub name: String,
    pub findings: Vec<Finding>,
    /// The threads the findings speak for.
    pub scope: Scope,
}

impl Report {
    /// Patchable: no check refused (and none was left undecided).
    pub fn verdict(&self) -> Verdict {
        self.findings
            .iter()
            .map(|f| f.verdict)
            .max()
            .unwrap_or(Verdict::Ok)
    }

    /// The reasons for a refusal, one per refusing check.
    pub fn refusals(&self) -> Vec<&str> {
        self.findings
            .iter()
            .filter(|f| f.verdict == Verdict::Refuse)
            .map(|f| f.detail.as_str())
            .collect()
    }
}

/// Look at process `pid` and fail, naming every reason, when it cannot be
/// patched: the engine's single entry point, before it writes anything.
/// A lean look ([`Depth::Lean`]): see [`Report::scope`] for what it
/// covered.
pub fn require_patchable(pid: i32, op: Operation) -> Result<Report, ProcessError> {
    require(pid, Depth::Lean, op)
}

/// [`require_patchable`] at a chosen depth.
pub fn require(pid: i32, depth: Depth, op: Operation) -> Result<Report, ProcessError> {
    let report = inspect(pid, depth, op)?;
    let refusals = report.refusals();
    if refusals.is_empty() {
        return Ok(report);
    }
    Err(ProcessError::NotPatchable {
        pid,
        reasons: refusals.join("; "),
    })
}

/// Every check for process `pid`.
pub fn inspect(pid: i32, depth: Depth, op: Operation) -> Result<Report, ProcessError> {
    let facts = Facts::read_at(pid, depth)?;
    let filters = match depth {
        Depth::Full | Depth::Lean if facts.filters_readable() => Some(read_filters(&facts)),
        _ => None,
    };
    let (findings, scope) = judge_scoped(&facts, filters.as_ref(), op);
    Ok(Report {
        pid,
        name: facts.name.clone(),
        findings,
        scope,
    })
}

/// Why thread `tid` of `pid` must not run a remote call that a look of
/// [`Scope::PlainThreads`] allowed (`None`: it is as plain as the main
/// thread was): a seccomp filter or strict mode, a shadow stack, another
/// tracer. One `status` read.
pub fn thread_unfit(pid: i32, tid: i32) -> Option<String> {
    let Some(status) = read(&format!("/proc/{pid}/task/{tid}/status")) else {
        return Some("its status cannot be read".into());
    };
    let t = parse_thread_status(tid, &status);
    t.unplain()
}

// ------------------------------------------------------------------ facts

/// One thread, from `/proc/PID/task/TID/status`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ThreadFacts {
    pub tid: i32,
    pub state: char,
    pub tracer: i32,
    /// `Seccomp:` 0 none, 1 strict, 2 filter.
    pub seccomp: u8,
    pub filters: u32,
    pub shadow_stack: bool,
}

impl ThreadFacts {
    /// What makes this thread other than plain: a seccomp mode, a shadow
    /// stack, a tracer, a stop or an exit (`None`: none of these).
    pub fn unplain(&self) -> Option<String> {
        if self.seccomp != 0 {
            Some(format!(
                "thread {} has a seccomp filter (mode {})",
                self.tid, self.seccomp
            ))
        } else if self.shadow_stack {
            Some(format!("thread {} has a CET shadow stack", self.tid))
        } else if self.tracer != 0 {
            Some(format!("thread {} is traced by pid {}", self.tid, self.tracer))
        } else if matches!(self.state, 'T' | 't' | 'Z' | 'X' | '?') {
            Some(format!("thread {} is in state {}", self.tid, self.state))
        } else {
            None
        }
    }
}

/// The facts about the tool's own right to ptrace.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Access {
    pub euid: u32,
    pub cap_sys_ptrace: bool,
    /// `kernel.yama.ptrace_scope`, if Yama is there.
    pub yama: Option<u8>,
    /// The target's real, effective and saved uids.
    pub target_uids: Vec<u32>,
    /// The target lives in another user namespace than the tool.
    pub other_userns: bool,
    /// Active LSMs that can refuse ptrace (AppArmor, SELinux, …).
    pub lsms: Vec<String>,
    /// The target holds capabilities the tool does not.
    pub target_more_caps: bool,
}

/// What `/proc` says about a process.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Facts {
    pub pid: i32,
    pub name: String,
    pub is_self: bool,
    /// The thread group (process) `pid` belongs to: not `pid` when `pid`
    /// names a thread other than the main one.
    pub tgid: i32,
    pub kthread: bool,
    /// State of the main thread (`/proc/PID/stat`).
    pub leader: char,
    pub threads: Vec<ThreadFacts>,
    /// The C library mapped (for `dlopen`), if any.
    pub libc: Option<String>,
    pub mapped: bool,
    /// Reading `/proc/PID/maps` was refused: why.
    pub maps_denied: Option<String>,
    pub access: Access,
    /// comm of each tracer pid.
    pub tracers: BTreeMap<i32, String>,
    /// The threads `threads` holds: every one, or the main one only.
    pub scope: Scope,
    /// How many threads the process has (`Threads:`), whatever `scope`.
    pub thread_count: usize,
}

/// The value of `key:` in a `/proc/.../status` text, trimmed.
pub(crate) fn field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .map(str::trim)
}

/// Parse one `/proc/.../status` into a thread's facts.
pub fn parse_thread_status(tid: i32, status: &str) -> ThreadFacts {
    let num = |k: &str| field(status, k).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
    ThreadFacts {
        tid,
        state: field(status, "State")
            .and_then(|s| s.chars().next())
            .unwrap_or('?'),
        tracer: num("TracerPid") as i32,
        seccomp: num("Seccomp") as u8,
        filters: num("Seccomp_filters") as u32,
        shadow_stack: field(status, "x86_Thread_features")
            .is_some_and(|f| f.split_whitespace().any(|w| w == "shstk")),
    }
}

/// A name another process chose (its `comm`: any bytes but NUL), fit for
/// one line of a message: control characters escaped, at most 64 chars.
pub fn printable(name: &str) -> String {
    name.chars()
        .take(64)
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

impl Facts {
    /// Every thread's facts.
    pub fn read(pid: i32) -> Result<Facts, ProcessError> {
        Self::read_at(pid, Depth::Full)
    }

    /// The facts a look at `depth` needs: at [`Depth::Lean`], the main
    /// thread only when it is plain.
    pub fn read_at(pid: i32, depth: Depth) -> Result<Facts, ProcessError> {
        let status_path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&status_path)
            .map_err(|e| ProcessError::from_io(pid, status_path.clone().into(), e))?;
        let stat = read(&format!("/proc/{pid}/stat")).unwrap_or_default();
        let leader = super::threads::parse_stat_state(&stat).unwrap_or('?');
        // PF_KTHREAD in the flags (field 9), for kernels without `Kthread:`.
        let flags = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(6))
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0);
        let kthread = field(&status, "Kthread") == Some("1") || flags & 0x0020_0000 != 0;
        let main = parse_thread_status(pid, &status);
        let lean = depth == Depth::Lean && main.unplain().is_none() && !kthread;
        let mut threads = Vec::new();
        if lean {
            threads.push(main);
        } else if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            let mut tids: Vec<i32> = dir
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect();
            tids.sort_unstable();
            for tid in tids {
                if let Some(s) = read(&format!("/proc/{pid}/task/{tid}/status")) {
                    threads.push(parse_thread_status(tid, &s));
                }
            }
        }
        if threads.is_empty() {
            threads.push(parse_thread_status(pid, &status));
        }
        let thread_count = match field(&status, "Threads").and_then(|v| v.parse().ok()) {
            Some(n) if lean => n,
            _ => threads.len(),
        };
        let (maps, maps_denied) = match std::fs::read_to_string(format!("/proc/{pid}/maps")) {
            Ok(m) => (m, None),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                (String::new(), Some(super::permission_hint(pid)))
            }
            Err(_) => (String::new(), None),
        };
        let libc = maps
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .find(|p| crate::reserved::is_c_library(p))
            .map(str::to_string);
        let mut tracers = BTreeMap::new();
        for t in threads.iter().filter(|t| t.tracer > 0) {
            let comm = read(&format!("/proc/{}/comm", t.tracer)).unwrap_or_default();
            tracers.insert(t.tracer, printable(comm.trim_end_matches('\n')));
        }
        Ok(Facts {
            pid,
            name: printable(field(&status, "Name").unwrap_or("")),
            is_self: pid == std::process::id() as i32,
            tgid: field(&status, "Tgid").and_then(|v| v.parse().ok()).unwrap_or(pid),
            kthread,
            leader,
            threads,
            libc,
            mapped: !maps.is_empty(),
            maps_denied,
            access: Access::read(pid, &status),
            tracers,
            scope: if lean {
                Scope::PlainThreads
            } else {
                Scope::EveryThread
            },
            thread_count,
        })
    }

    fn live_threads(&self) -> impl Iterator<Item = &ThreadFacts> {
        self.threads.iter().filter(|t| !matches!(t.state, 'Z' | 'X'))
    }

    /// Whether reading filters makes sense: a live user process nobody
    /// else traces and no signal stopped.
    fn filters_readable(&self) -> bool {
        !self.kthread
            && !self.is_self
            && self.leader != 'Z'
            && self.live_threads().all(|t| t.state != 'T' && t.tracer == 0)
            && self.threads.iter().any(|t| t.seccomp == 2)
    }
}

impl Access {
    /// The facts for process `pid`.
    pub fn of(pid: i32) -> Access {
        Access::read(pid, &read(&format!("/proc/{pid}/status")).unwrap_or_default())
    }

    fn read(pid: i32, target_status: &str) -> Access {
        let own = read("/proc/self/status").unwrap_or_default();
        let cap_eff = field(&own, "CapEff")
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .unwrap_or(0);
        let euid = field(&own, "Uid")
            .and_then(|v| v.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(u32::MAX);
        let target_uids = field(target_status, "Uid")
            .map(|v| {
                v.split_whitespace()
                    .take(3)
                    .filter_map(|u| u.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let caps = |status: &str| {
            field(status, "CapPrm")
                .and_then(|v| u64::from_str_radix(v, 16).ok())
                .unwrap_or(0)
        };
        let target_more_caps = caps(target_status) & !cap_eff != 0;
        let ns = |p: &str| std::fs::read_link(p).ok();
        let (mine, theirs) = (ns("/proc/self/ns/user"), ns(&format!("/proc/{pid}/ns/user")));
        Access {
            euid,
            cap_sys_ptrace: cap_eff & (1 << 19) != 0,
            yama: read("/proc/sys/kernel/yama/ptrace_scope").and_then(|s| s.trim().parse().ok()),
            target_uids,
            other_userns: mine.is_some() && theirs.is_some() && mine != theirs,
            lsms: match read("/sys/kernel/security/lsm") {
                Some(l) => l
                    .trim()
                    .split(',')
                    .filter(|l| matches!(*l, "apparmor" | "selinux" | "smack" | "tomoyo" | "landlock"))
                    .map(str::to_string)
                    .collect(),
                // securityfs not mounted: which LSMs run is unknown.
                None => vec!["Landlock, AppArmor, SELinux…: /sys/kernel/security/lsm is not readable".into()],
            },
            target_more_caps,
        }
    }

    /// Why ptrace of the target would be (or was) refused, as far as the
    /// facts tell; `None` when nothing here stands in the way.
    pub fn obstacle(&self) -> Option<String> {
        if self.yama == Some(3) {
            return Some(
                "Yama ptrace_scope is 3: ptrace is disabled for everyone, root included, until reboot".into(),
            );
        }
        if !self.cap_sys_ptrace {
            let foreign = self.target_uids.iter().any(|&u| u != self.euid);
            if foreign {
                return Some(format!(
                    "the process runs as uid {}, the tool as uid {} without CAP_SYS_PTRACE",
                    self.target_uids.first().copied().unwrap_or(u32::MAX),
                    self.euid
                ));
            }
            match self.yama {
                Some(1) => {
                    return Some(
                        "Yama ptrace_scope is 1: without CAP_SYS_PTRACE only a process's ancestors may trace it"
                            .into(),
                    );
                }
                Some(2) => return Some("Yama ptrace_scope is 2: tracing needs CAP_SYS_PTRACE".into()),
                _ => {}
            }
        }
        None
    }

    /// What else may refuse ptrace when the facts above allow it.
    pub fn hidden_reasons(&self) -> String {
        let mut why = Vec::new();
        if self.other_userns {
            why.push(
                "the process is in another user namespace (CAP_SYS_PTRACE counts only in an ancestor namespace)"
                    .to_string(),
            );
        }
        if self.target_more_caps && self.other_userns {
            why.push("the process holds capabilities the tool lacks".to_string());
        }
        if !self.lsms.is_empty() {
            why.push(format!("an LSM policy ({})", self.lsms.join(", ")));
        }
        why.push("a process made non-dumpable (PR_SET_DUMPABLE 0) in another user namespace".into());
        why.join(", or ")
    }
}

// ------------------------------------------------------------ the calls

/// What the process must do with a system call's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// It must run: a failure breaks the apply.
    Run,
    /// A clean failure is handled (`ERRNO`, `TRACE`): only answers that
    /// kill, trap or wait for a supervisor are refused.
    Survive,
}

/// What the tool is about to do to the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Everything: the record may be created and the patch is `dlopen`ed.
    Apply,
    /// Remote calls on the record's slots and core serialisation only: a
    /// process that forbids `dlopen` or memfds can still be reverted.
    Revert,
}

/// One system call the tool makes in a target (directly, or inside the
/// target's `dlopen`), with the arguments known in advance.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    pub name: &'static str,
    pub nr: u32,
    pub args: [Option<u64>; 6],
    pub need: Need,
    pub why: &'static str,
    /// Made by `apply` only.
    pub apply_only: bool,
}

impl Call {
    pub fn made_by(&self, op: Operation) -> bool {
        op == Operation::Apply || !self.apply_only
    }
}

const PROT_NONE: u64 = 0;
const PROT_R: u64 = 1;
const PROT_RW: u64 = 3;
const PROT_RX: u64 = 5;
const MAP_PRIVATE: u64 = 0x2;
const MAP_FIXED: u64 = 0x10;
const MAP_ANONYMOUS: u64 = 0x20;
const MAP_DENYWRITE: u64 = 0x800;
const MAP_NORESERVE: u64 = 0x4000;
const MAP_FIXED_NOREPLACE: u64 = 0x10_0000;
const NO_FD: u64 = u64::MAX;
const AT_FDCWD: u64 = -100i64 as u64;
const O_CLOEXEC: u64 = 0o2_000_000;
const AT_EMPTY_PATH: u64 = 0x1000;

const fn call(name: &'static str, nr: u32, args: [Option<u64>; 6], need: Need, why: &'static str) -> Call {
    Call {
        name,
        nr,
        args,
        need,
        why,
        apply_only: false,
    }
}

/// A call only `apply` makes (the record's creation, `dlopen`).
const fn apply(c: Call) -> Call {
    Call {
        apply_only: true,
        ..c
    }
}

const U: Option<u64> = None;
const fn k(v: u64) -> Option<u64> {
    Some(v)
}

/// Every system call a patch session makes in the target: `process::remote`
/// (bootstrap `mmap` + `mprotect`, `munmap` on release and cleanup,
/// `prctl` naming the region), `engine::target` (state record: memfd,
/// `ftruncate`, shared `mmap`, `close`; slot and trampoline pages:
/// `mmap`, `mprotect`; `membarrier` and the `mprotect` fallback that
/// serialise cores), and what glibc's `dlopen` does for the patch
/// (`openat`, `read`, `fstat`, `pread64`, `mmap` of each segment and the
/// bss, `mprotect` of gaps and RELRO, `munmap`, `close`, its lock, `brk`
/// from malloc); plus `restart_syscall`, which a thread interrupted in a
/// sleep runs when it resumes. Unknown arguments are `None`.
#[rustfmt::skip]
pub const CALLS: &[Call] = &[
    // process::remote
    call("mmap", 9, [U, U, k(PROT_RW), k(MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE), k(NO_FD), k(0)],
         Need::Run, "maps the remote-call region"),
    call("mprotect", 10, [U, k(0x1000), k(PROT_RX), U, U, U], Need::Run, "makes the remote-call stub executable"),
    call("munmap", 11, [U; 6], Need::Survive, "unmaps a call region or a failed mapping"),
    call("prctl", 157, [k(0x5356_4d41), k(0), U, U, U, U], Need::Survive, "names the call region (PR_SET_VMA_ANON_NAME)"),
    // engine::target
    call("mmap", 9, [U, U, k(PROT_RW), k(MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE), k(NO_FD), k(0)],
         Need::Run, "maps slot and trampoline pages near the image"),
    call("mprotect", 10, [U, k(0x10000), k(PROT_RX), U, U, U], Need::Run, "makes the trampoline page executable"),
    call("mprotect", 10, [U, k(0x1000), k(PROT_R), U, U, U], Need::Survive, "serialises cores (TLB shootdown)"),
    call("mprotect", 10, [U, k(0x1000), k(PROT_RW), U, U, U], Need::Survive, "serialises cores (TLB shootdown)"),
    call("membarrier", 324, [k(32), k(0), k(0), U, U, U], Need::Survive, "serialises cores (SYNC_CORE)"),
    apply(call("memfd_create", 319, [U; 6], Need::Run, "creates the in-process record of patches")),
    apply(call("ftruncate", 77, [U; 6], Need::Run, "sizes the record")),
    apply(call("mmap", 9, [k(0), U, k(PROT_R), k(MAP_PRIVATE), U, k(0)], Need::Run, "maps the record")),
    apply(call("mmap", 9, [U, U, k(PROT_RX), k(MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE), k(NO_FD), k(0)],
         Need::Run, "maps trampoline pages near the image")),
    // process::program: the clock of its deadline, the naps of its
    // rendezvous points, and giving back a lent priority
    call("clock_gettime", 228, [k(1), U, U, U, U, U], Need::Run, "times the one-trip program's waits"),
    call("nanosleep", 35, [U; 6], Need::Survive, "the one-trip program's naps at its rendezvous points"),
    call("sched_setattr", 314, [k(0), U, k(0), U, U, U], Need::Survive, "gives back the priority lent for the trip"),
    apply(call("close", 3, [U; 6], Need::Survive, "closes the record's descriptor")),
    // glibc's dlopen of the patch
    apply(call("openat", 257, [k(AT_FDCWD), U, k(O_CLOEXEC), U, U, U], Need::Run, "dlopen opens the patch")),
    apply(call("read", 0, [U; 6], Need::Run, "dlopen reads the patch's ELF header")),
    apply(call("newfstatat", 262, [U, U, U, k(AT_EMPTY_PATH), U, U], Need::Run, "dlopen identifies the patch file")),
    apply(call("fstat", 5, [U; 6], Need::Survive, "dlopen identifies the patch file (older libcs)")),
    apply(call("pread64", 17, [U; 6], Need::Survive, "dlopen reads program headers and notes")),
    apply(call("mmap", 9, [U, U, k(PROT_R), k(MAP_PRIVATE | MAP_DENYWRITE), U, k(0)], Need::Run, "dlopen reserves the patch's address range")),
    apply(call("mmap", 9, [U, U, k(PROT_RX), k(MAP_PRIVATE | MAP_DENYWRITE | MAP_FIXED), U, U], Need::Run, "dlopen maps the patch's code")),
    apply(call("mmap", 9, [U, U, k(PROT_R), k(MAP_PRIVATE | MAP_DENYWRITE | MAP_FIXED), U, U], Need::Run, "dlopen maps the patch's read-only data")),
    apply(call("mmap", 9, [U, U, k(PROT_RW), k(MAP_PRIVATE | MAP_DENYWRITE | MAP_FIXED), U, U], Need::Run, "dlopen maps the patch's data")),
    apply(call("mmap", 9, [U, U, k(PROT_RW), k(MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED), k(NO_FD), k(0)], Need::Run, "dlopen maps the patch's bss")),
    apply(call("mprotect", 10, [U, U, k(PROT_NONE), U, U, U], Need::Run, "dlopen protects gaps between the patch's segments")),
    apply(call("mprotect", 10, [U, U, k(PROT_R), U, U, U], Need::Run, "dlopen write-protects the patch's RELRO")),
    apply(call("futex", 202, [U; 6], Need::Survive, "dlopen's lock")),
    apply(call("brk", 12, [U; 6], Need::Survive, "malloc inside dlopen")),
    // a thread interrupted in a sleep, when it resumes
    call("restart_syscall", 219, [U; 6], Need::Survive, "a sleep the remote call interrupted restarts"),
];

/// The filters of each filtered thread, or why they could not be read.
pub type ThreadFilters = BTreeMap<i32, Result<Vec<Program>, String>>;

/// `PTRACE_SECCOMP_GET_FILTER`.
const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;

/// The kernel's limit on a thread's filters (`MAX_INSNS_PER_PATH` of 32768
/// instructions, at least 4 per filter, allows fewer than this).
const MAX_FILTERS: u32 = 8192;

/// How long a thread may take to reach the interrupt stop.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// Read the filters of every thread that has any: each stopped for the
/// reads alone, then let go (also on every error path: [`Traced`] detaches
/// when dropped).
fn read_filters(facts: &Facts) -> ThreadFilters {
    let mut out = BTreeMap::new();
    for t in facts.live_threads().filter(|t| t.seccomp == 2) {
        // Kernels before 5.9 show no count: read until there is no more.
        let count = if t.filters > 0 { t.filters } else { MAX_FILTERS };
        let r = thread_filters(facts.pid, t.tid, count);
        match r {
            Err(ProcessError::NoSuchThread { .. }) => {}
            other => {
                out.insert(t.tid, other.map_err(|e| e.to_string()));
            }
        }
    }
    out
}

fn thread_filters(pid: i32, tid: i32, count: u32) -> Result<Vec<Program>, ProcessError> {
    let mut traced = Traced::seize(pid, tid)?;
    traced.interrupt(STOP_WAIT)?;
    let mut programs = Vec::new();
    for index in 0..count.min(MAX_FILTERS) {
        let get = |buf: *mut libc::c_void| {
            // SAFETY: the thread is our tracee in a ptrace stop; with a null
            // buffer the kernel only returns the length, otherwise it copies
            // that many 8-byte instructions into `buf`, which the caller
            // sized for them.
            let n = unsafe { libc::ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index as libc::c_ulong, buf) };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        };
        let fail = |e: std::io::Error| ProcessError::Unsupported {
            pid,
            what: format!(
                "thread {tid}: cannot read seccomp filter {index} (PTRACE_SECCOMP_GET_FILTER): {e}"
            ),
        };
        let len = match get(std::ptr::null_mut()) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(fail(e)),
        };
        if len == 0 || len > seccomp::MAX_INSNS {
            return Err(fail(std::io::Error::other(format!("{len} instructions"))));
        }
        let mut buf = vec![0u8; len * 8];
        let got = get(buf.as_mut_ptr().cast()).map_err(fail)?;
        buf.truncate(got.min(len) * 8);
        let program = Program::parse(&buf).map_err(|e| ProcessError::Unsupported {
            pid,
            what: format!("thread {tid}: seccomp filter {index}: {e}"),
        })?;
        programs.push(program);
    }
    traced.detach()?;
    Ok(programs)
}

// --------------------------------------------------------------- judging

/// The findings for `facts` (pure); `filters` as read by a full look.
pub fn judge(facts: &Facts, filters: Option<&ThreadFilters>, op: Operation) -> Vec<Finding> {
    judge_scoped(facts, filters, op).0
}

/// The findings, and which threads may run the calls.
pub fn judge_scoped(facts: &Facts, filters: Option<&ThreadFilters>, op: Operation) -> (Vec<Finding>, Scope) {
    let mut scope = facts.scope;
    let out = judge_into(facts, filters, op, &mut scope);
    (out, scope)
}

fn judge_into(
    facts: &Facts,
    filters: Option<&ThreadFilters>,
    op: Operation,
    scope: &mut Scope,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let live: Vec<&ThreadFacts> = facts.live_threads().collect();
    // What the process is.
    let process = if facts.tgid != facts.pid && facts.tgid > 0 {
        Some(format!(
            "{} is a thread of process {}: name the process (its locks and records are per process)",
            facts.pid, facts.tgid
        ))
    } else if facts.is_self {
        Some("it is this hotpatch process itself".to_string())
    } else if facts.kthread {
        Some("it is a kernel thread: no user address space to patch".to_string())
    } else if live.is_empty() || (facts.leader == 'Z' && facts.threads.len() == 1) {
        Some("it is a zombie: it has exited and waits for its parent to reap it".to_string())
    } else if matches!(facts.leader, 'Z' | 'X') {
        Some(format!(
            "its main thread has exited while {} other thread{} still run{}; hotpatch reads a process's memory map through its main thread and cannot patch it",
            live.len(),
            if live.len() == 1 { "" } else { "s" },
            if live.len() == 1 { "s" } else { "" },
        ))
    } else if let Some(why) = &facts.maps_denied {
        Some(format!("reading its memory map is not permitted: {why}"))
    } else if !facts.mapped {
        // A live user process always maps something (its stack, the
        // vDSO); an empty map is one whose memory went as it exited.
        Some("it has exited: its memory map is already empty".to_string())
    } else {
        None
    };
    if let Some(why) = process {
        // Nothing else about it matters.
        out.push(finding(Check::Process, Verdict::Refuse, why));
        return out;
    }
    let count = facts.thread_count.max(live.len());
    out.push(finding(
        Check::Process,
        Verdict::Ok,
        format!(
            "{} ({count} thread{}{})",
            facts.name,
            if count == 1 { "" } else { "s" },
            match facts.scope {
                Scope::EveryThread => "",
                Scope::PlainThreads => {
                    "; the main thread's state read, any other thread's when a remote call would use it"
                }
            }
        ),
    ));
    // Stopped by a signal.
    let stopped: Vec<i32> = live.iter().filter(|t| t.state == 'T').map(|t| t.tid).collect();
    out.push(if stopped.is_empty() {
        finding(Check::Stopped, Verdict::Ok, "not stopped")
    } else {
        finding(
            Check::Stopped,
            Verdict::Refuse,
            format!(
                "it is stopped by a signal (job control: SIGSTOP, SIGTSTP…; state T{}); it stays stopped — `kill -CONT {}` resumes it",
                if stopped.len() == live.len() {
                    String::new()
                } else {
                    format!(" in threads {}", list(&stopped))
                },
                facts.pid
            ),
        )
    });
    // Traced by someone else.
    let mut by: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for t in live.iter().filter(|t| t.tracer > 0) {
        by.entry(t.tracer).or_default().push(t.tid);
    }
    out.push(if by.is_empty() {
        finding(Check::Tracer, Verdict::Ok, "not traced")
    } else {
        let who: Vec<String> = by
            .iter()
            .map(|(tracer, tids)| {
                let comm = facts.tracers.get(tracer).map_or("?", String::as_str);
                if comm == "hotpatch" {
                    return format!("pid {tracer} (another hotpatch, working on it right now: try again)");
                }
                let scope = if tids.len() == live.len() {
                    String::new()
                } else {
                    format!(" (threads {})", list(tids))
                };
                format!("pid {tracer} ({comm}){scope}")
            })
            .collect();
        finding(
            Check::Tracer,
            Verdict::Refuse,
            format!(
                "it is traced by {} (a debugger or tracer; a thread has only one tracer); detach it first",
                who.join(", ")
            ),
        )
    });
    // ptrace at all.
    out.push(match facts.access.obstacle() {
        Some(why) => finding(
            Check::Ptrace,
            Verdict::Refuse,
            format!("ptrace will be refused: {why}"),
        ),
        None => finding(
            Check::Ptrace,
            Verdict::Ok,
            if facts.access.cap_sys_ptrace {
                "allowed (CAP_SYS_PTRACE)".to_string()
            } else {
                "allowed (same uid)".to_string()
            },
        ),
    });
    // CET.
    let shstk: Vec<i32> = live.iter().filter(|t| t.shadow_stack).map(|t| t.tid).collect();
    out.push(if shstk.is_empty() {
        finding(Check::Cet, Verdict::Ok, "no shadow stack")
    } else {
        finding(
            Check::Cet,
            Verdict::Refuse,
            format!(
                "it uses CET shadow stacks (threads {}): the remote-call stub returns with `ret` and would fault",
                list(&shstk)
            ),
        )
    });
    out.push(judge_seccomp(facts.pid, &live, filters, op, scope));
    out.push(finding(
        Check::Mdwe,
        Verdict::Ok,
        "not visible from outside; if mprotect(PROT_EXEC) is refused (MDWE), the bootstrap stops and unmaps what it mapped",
    ));
    out.push(match &facts.libc {
        Some(path) => finding(Check::Libc, Verdict::Ok, path.clone()),
        None => finding(
            Check::Libc,
            Verdict::Refuse,
            "it maps no C library (statically linked?): there is no dlopen to load a patch with",
        ),
    });
    out
}

fn list(tids: &[i32]) -> String {
    const SHOWN: usize = 8;
    let mut s: Vec<String> = tids.iter().take(SHOWN).map(i32::to_string).collect();
    if tids.len() > SHOWN {
        s.push(format!("and {} more", tids.len() - SHOWN));
    }
    s.join(", ")
}

fn judge_seccomp(
    pid: i32,
    live: &[&ThreadFacts],
    filters: Option<&ThreadFilters>,
    op: Operation,
    scope: &mut Scope,
) -> Finding {
    let strict: Vec<i32> = live.iter().filter(|t| t.seccomp == 1).map(|t| t.tid).collect();
    if !strict.is_empty() {
        return finding(
            Check::Seccomp,
            Verdict::Refuse,
            format!(
                "threads {} run in strict seccomp mode: any system call but read, write, exit and sigreturn kills the process",
                list(&strict)
            ),
        );
    }
    let filtered: Vec<i32> = live.iter().filter(|t| t.seccomp == 2).map(|t| t.tid).collect();
    if filtered.is_empty() {
        return finding(Check::Seccomp, Verdict::Ok, "no filter");
    }
    let Some(filters) = filters else {
        return finding(
            Check::Seccomp,
            Verdict::Unknown,
            format!(
                "threads {} have seccomp filters, not read here (`hotpatch doctor {pid}` reads them)",
                list(&filtered)
            ),
        );
    };
    // Refusals in the order of CALLS: what the filter does, the uses
    // that need the call, the threads.
    let mut bad: Vec<Refusal> = Vec::new();
    let mut note = |what: String, why: Option<&'static str>, tid: i32| {
        let at = match bad.iter().position(|r| r.what == what) {
            Some(i) => i,
            None => {
                bad.push(Refusal {
                    what,
                    uses: Vec::new(),
                    tids: std::collections::BTreeSet::new(),
                });
                bad.len() - 1
            }
        };
        let r = &mut bad[at];
        if let Some(why) = why
            && !r.uses.contains(&why)
        {
            r.uses.push(why);
        }
        r.tids.insert(tid);
    };
    for &tid in &filtered {
        let programs = match filters.get(&tid) {
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                note(
                    format!("its filters could not be read ({e}), so they may kill it"),
                    None,
                    tid,
                );
                continue;
            }
            // Exited since: nothing to fear from it.
            None => continue,
        };
        for c in CALLS.iter().filter(|c| c.made_by(op)) {
            let query = Query::x86_64(c.nr, c.args);
            match seccomp::strongest(programs, &query) {
                Ok(None) => {}
                Ok(Some(answer)) => {
                    let ok = answer.allows() || (c.need == Need::Survive && answer.fails_cleanly());
                    if !ok {
                        note(
                            format!("{} gets {answer}{}", c.name, consequence(answer)),
                            Some(c.why),
                            tid,
                        );
                    }
                }
                Err(e) => note(format!("{} cannot be evaluated ({e})", c.name), Some(c.why), tid),
            }
        }
    }
    if bad.is_empty() {
        return finding(
            Check::Seccomp,
            Verdict::Ok,
            format!(
                "filters on threads {} allow every system call hotpatch makes in the process",
                list(&filtered)
            ),
        );
    }
    let all = filtered.len();
    // Threads the calls can run on instead: none of them is filtered.
    let plain = live.iter().filter(|t| t.unplain().is_none()).count();
    let reasons: Vec<String> = bad
        .into_iter()
        .map(|r| {
            let tids: Vec<i32> = r.tids.into_iter().collect();
            let threads = if tids.len() == all && all > 1 {
                "every filtered thread".to_string()
            } else {
                format!("thread{} {}", if tids.len() == 1 { "" } else { "s" }, list(&tids))
            };
            let uses = match r.uses.as_slice() {
                [] => String::new(),
                [one] => format!(" (needed: {one})"),
                [first, rest @ ..] => format!(
                    " (needed: {first}, and {} more use{})",
                    rest.len(),
                    if rest.len() == 1 { "" } else { "s" }
                ),
            };
            format!("{} on {threads}{uses}", r.what)
        })
        .collect();
    if plain > 0 {
        *scope = Scope::PlainThreads;
        return finding(
            Check::Seccomp,
            Verdict::Ok,
            format!(
                "its seccomp filter: {}; hotpatch runs its calls on the {plain} thread{} without a filter only",
                reasons.join("; "),
                if plain == 1 { "" } else { "s" }
            ),
        );
    }
    finding(
        Check::Seccomp,
        Verdict::Refuse,
        format!("its seccomp filter: {}", reasons.join("; ")),
    )
}

/// One thing a filter does that hotpatch cannot live with.
struct Refusal {
    what: String,
    uses: Vec<&'static str>,
    tids: std::collections::BTreeSet<i32>,
}

fn consequence(answer: Outcome) -> &'static str {
    let Outcome::Ret(v) = answer else {
        return " (it may kill the process)";
    };
    match v & seccomp::ret::ACTION_FULL {
        seccomp::ret::KILL_PROCESS => " (it would kill the process)",
        seccomp::ret::KILL_THREAD => " (it would kill the thread running the call)",
        seccomp::ret::TRAP => " (a SIGSYS in the middle of the remote call)",
        seccomp::ret::USER_NOTIF => " (the call would wait for a seccomp supervisor)",
        seccomp::ret::ERRNO | seccomp::ret::TRACE => " (the apply would fail half-way)",
        _ => " (it would kill the process)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seccomp::{Insn, op, ret};

    fn thread(tid: i32, state: char) -> ThreadFacts {
        ThreadFacts {
            tid,
            state,
            ..Default::default()
        }
    }

    fn facts(threads: Vec<ThreadFacts>) -> Facts {
        Facts {
            pid: 100,
            tgid: 100,
            name: "server".into(),
            leader: threads.first().map_or('S', |t| t.state),
            threads,
            libc: Some("/usr/lib/x86_64-linux-gnu/libc.so.6".into()),
            mapped: true,
            access: Access {
                euid: 0,
                cap_sys_ptrace: true,
                yama: Some(1),
                target_uids: vec![1000, 1000, 1000],
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn refusals(f: &[Finding]) -> Vec<(Check, String)> {
        f.iter()
            .filter(|f| f.verdict == Verdict::Refuse)
            .map(|f| (f.check, f.detail.clone()))
            .collect()
    }

    #[test]
    fn a_plain_process_passes() {
        let f = judge(
            &facts(vec![thread(100, 'S'), thread(101, 'R')]),
            None,
            Operation::Apply,
        );
        assert!(refusals(&f).is_empty(), "{f:?}");
        assert!(f.iter().all(|f| f.verdict == Verdict::Ok));
    }

    #[test]
    fn names_what_the_process_is() {
        let mut k = facts(vec![thread(2, 'S')]);
        k.kthread = true;
        k.mapped = false;
        let r = refusals(&judge(&k, None, Operation::Apply));
        assert_eq!(r.len(), 1);
        assert!(r[0].1.contains("kernel thread"), "{r:?}");

        let z = facts(vec![thread(100, 'Z')]);
        assert!(
            refusals(&judge(&z, None, Operation::Apply))[0]
                .1
                .contains("zombie")
        );

        let mut thread_of = facts(vec![thread(100, 'S')]);
        thread_of.tgid = 99;
        let r = refusals(&judge(&thread_of, None, Operation::Apply));
        assert!(r[0].1.contains("100 is a thread of process 99"), "{r:?}");

        let mut leader_gone = facts(vec![thread(100, 'Z'), thread(101, 'S'), thread(102, 'S')]);
        leader_gone.mapped = false;
        let r = refusals(&judge(&leader_gone, None, Operation::Apply));
        assert!(
            r[0].1
                .contains("main thread has exited while 2 other threads still run"),
            "{r:?}"
        );
    }

    #[test]
    fn names_a_stop_and_the_tracer() {
        let f = facts(vec![thread(100, 'T'), thread(101, 'T')]);
        let r = refusals(&judge(&f, None, Operation::Apply));
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, Check::Stopped);
        assert!(r[0].1.contains("kill -CONT 100"), "{r:?}");

        let mut t = facts(vec![thread(100, 'S'), thread(101, 't')]);
        for th in &mut t.threads {
            th.tracer = 555;
        }
        t.tracers.insert(555, "strace".into());
        let r = refusals(&judge(&t, None, Operation::Apply));
        assert_eq!(r.len(), 1);
        assert!(r[0].1.contains("traced by pid 555 (strace)"), "{r:?}");
    }

    #[test]
    fn says_why_ptrace_is_refused_even_for_root() {
        let mut f = facts(vec![thread(100, 'S')]);
        f.access.yama = Some(3);
        let r = refusals(&judge(&f, None, Operation::Apply));
        assert!(r[0].1.contains("ptrace_scope is 3"), "{r:?}");
        let mut user = facts(vec![thread(100, 'S')]);
        user.access.cap_sys_ptrace = false;
        user.access.euid = 1001;
        let r = refusals(&judge(&user, None, Operation::Apply));
        assert!(r[0].1.contains("uid 1000, the tool as uid 1001"), "{r:?}");
        user.access.euid = 1000;
        assert!(
            refusals(&judge(&user, None, Operation::Apply))[0]
                .1
                .contains("ptrace_scope is 1")
        );
        let mut ns = facts(vec![thread(100, 'S')]);
        ns.access.other_userns = true;
        assert!(ns.access.hidden_reasons().contains("another user namespace"));
    }

    #[test]
    fn names_fit_one_line() {
        assert_eq!(printable("gdb"), "gdb");
        assert_eq!(printable("a\nhotpatch: ok\r"), "a\\nhotpatch: ok\\r");
        assert_eq!(printable(&"x".repeat(100)).len(), 64);
    }

    #[test]
    fn parses_status() {
        let s = "Name:\tx\nState:\tS (sleeping)\nTracerPid:\t42\nSeccomp:\t2\nSeccomp_filters:\t3\nx86_Thread_features:\tshstk wrss\n";
        let t = parse_thread_status(7, s);
        assert_eq!(
            t,
            ThreadFacts {
                tid: 7,
                state: 'S',
                tracer: 42,
                seccomp: 2,
                filters: 3,
                shadow_stack: true
            }
        );
        let plain = parse_thread_status(8, "State:\tR (running)\nx86_Thread_features:\t\n");
        assert!(!plain.shadow_stack && plain.filters == 0 && plain.tracer == 0);
    }

    #[test]
    fn refuses_cet_and_a_process_without_libc() {
        let mut f = facts(vec![thread(100, 'S')]);
        f.threads[0].shadow_stack = true;
        f.libc = None;
        let checks: Vec<Check> = refusals(&judge(&f, None, Operation::Apply))
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(checks, [Check::Cet, Check::Libc]);
    }

    /// `nr == kill → action`, else allow.
    fn one(nr: u32, action: u32) -> Program {
        Program::new(vec![
            Insn::new(op::LD | op::W | op::ABS, 0, 0, 0),
            Insn::new(op::JMP | op::JEQ | op::K, 0, 1, nr),
            Insn::new(op::RET | op::K, 0, 0, action),
            Insn::new(op::RET | op::K, 0, 0, ret::ALLOW),
        ])
        .unwrap()
    }

    fn filtered(programs: Vec<(i32, Vec<Program>)>) -> (Facts, ThreadFilters) {
        let mut threads: Vec<ThreadFacts> = programs.iter().map(|(tid, _)| thread(*tid, 'S')).collect();
        for (t, (_, p)) in threads.iter_mut().zip(&programs) {
            t.seccomp = if p.is_empty() { 0 } else { 2 };
            t.filters = p.len() as u32;
        }
        let filters = programs.into_iter().map(|(tid, p)| (tid, Ok(p))).collect();
        (facts(threads), filters)
    }

    fn seccomp_finding(f: &Facts, filters: &ThreadFilters) -> Finding {
        judge(f, Some(filters), Operation::Apply)
            .into_iter()
            .find(|f| f.check == Check::Seccomp)
            .unwrap()
    }

    #[test]
    fn seccomp_names_the_call_the_action_and_the_thread() {
        let (f, filters) = filtered(vec![(100, vec![one(10, ret::KILL_PROCESS)])]);
        let s = seccomp_finding(&f, &filters);
        assert_eq!(s.verdict, Verdict::Refuse);
        assert!(
            s.detail.contains(
                "mprotect gets KILL_PROCESS (it would kill the process) on thread 100 (needed: makes the remote-call stub executable, and 4 more uses)"
            ),
            "{}",
            s.detail
        );
        assert!(s.detail.contains("on thread 100"), "{}", s.detail);

        assert_eq!(
            judge_scoped(&f, Some(&filters), Operation::Apply).1,
            Scope::EveryThread
        );

        // Only the second thread has the killing filter: the calls can run
        // on the first, and only on threads without a filter.
        let (f, filters) = filtered(vec![(100, vec![]), (101, vec![one(319, ret::KILL_THREAD)])]);
        let s = seccomp_finding(&f, &filters);
        assert!(
            s.detail.contains("memfd_create")
                && s.detail.contains("KILL_THREAD")
                && s.detail.contains("on thread 101")
                && s.detail.contains("on the 1 thread without a filter only"),
            "{}",
            s.detail
        );
        assert_eq!(s.verdict, Verdict::Ok);
        assert_eq!(
            judge_scoped(&f, Some(&filters), Operation::Apply).1,
            Scope::PlainThreads
        );
        // A filter that allows everything leaves every thread usable.
        let (f, filters) = filtered(vec![(100, vec![]), (101, vec![one(319, ret::ALLOW)])]);
        assert_eq!(seccomp_finding(&f, &filters).verdict, Verdict::Ok);
        assert_eq!(
            judge_scoped(&f, Some(&filters), Operation::Apply).1,
            Scope::EveryThread
        );
    }

    #[test]
    fn a_thread_is_plain_without_filter_shadow_stack_tracer_or_stop() {
        assert_eq!(thread(7, 'S').unplain(), None);
        assert_eq!(thread(7, 'R').unplain(), None);
        for (t, what) in [
            (
                ThreadFacts {
                    seccomp: 2,
                    ..thread(7, 'S')
                },
                "seccomp filter",
            ),
            (
                ThreadFacts {
                    seccomp: 1,
                    ..thread(7, 'S')
                },
                "seccomp filter (mode 1)",
            ),
            (
                ThreadFacts {
                    shadow_stack: true,
                    ..thread(7, 'S')
                },
                "shadow stack",
            ),
            (
                ThreadFacts {
                    tracer: 9,
                    ..thread(7, 'S')
                },
                "traced by pid 9",
            ),
            (thread(7, 'T'), "state T"),
            (thread(7, 't'), "state t"),
            (thread(7, 'Z'), "state Z"),
        ] {
            let why = t.unplain().unwrap_or_default();
            assert!(why.contains(what) && why.contains("thread 7"), "{why}");
        }
    }

    #[test]
    fn revert_needs_fewer_calls_than_apply() {
        let (f, filters) = filtered(vec![(
            100,
            vec![one(319, ret::KILL_PROCESS), one(257, ret::ERRNO | 1)],
        )]);
        let at = |op| {
            judge(&f, Some(&filters), op)
                .into_iter()
                .find(|x| x.check == Check::Seccomp)
                .unwrap()
        };
        let apply = at(Operation::Apply);
        assert_eq!(apply.verdict, Verdict::Refuse);
        assert!(
            apply.detail.contains("memfd_create") && apply.detail.contains("openat"),
            "{}",
            apply.detail
        );
        assert_eq!(at(Operation::Revert).verdict, Verdict::Ok);
        let (f, filters) = filtered(vec![(100, vec![one(324, ret::TRAP)])]);
        let revert = judge(&f, Some(&filters), Operation::Revert);
        let seccomp = revert.iter().find(|x| x.check == Check::Seccomp).unwrap();
        assert_eq!(
            seccomp.verdict,
            Verdict::Refuse,
            "membarrier is made by revert too"
        );
    }

    #[test]
    fn seccomp_errno_refuses_needed_calls_and_spares_optional_ones() {
        let (f, filters) = filtered(vec![(100, vec![one(10, ret::ERRNO | 1)])]);
        let s = seccomp_finding(&f, &filters);
        assert_eq!(s.verdict, Verdict::Refuse);
        assert!(s.detail.contains("ERRNO(1"), "{}", s.detail);
        // membarrier failing is handled (another way serialises cores)…
        let (f, filters) = filtered(vec![(100, vec![one(324, ret::ERRNO | 1)])]);
        assert_eq!(seccomp_finding(&f, &filters).verdict, Verdict::Ok);
        // …a trap is not.
        let (f, filters) = filtered(vec![(100, vec![one(324, ret::TRAP)])]);
        assert_eq!(seccomp_finding(&f, &filters).verdict, Verdict::Refuse);
        // Unrelated calls do not matter; LOG is fine.
        let (f, filters) = filtered(vec![(100, vec![one(59, ret::KILL_PROCESS), one(9, ret::LOG)])]);
        assert_eq!(seccomp_finding(&f, &filters).verdict, Verdict::Ok);
    }

    #[test]
    fn seccomp_unread_filters_are_unknown_or_refused() {
        let (f, _) = filtered(vec![(100, vec![one(10, ret::ALLOW)])]);
        assert_eq!(
            judge(&f, None, Operation::Apply)
                .iter()
                .find(|x| x.check == Check::Seccomp)
                .unwrap()
                .verdict,
            Verdict::Unknown
        );
        let mut failed = ThreadFilters::new();
        failed.insert(100, Err("EACCES".into()));
        let s = seccomp_finding(&f, &failed);
        assert_eq!(s.verdict, Verdict::Refuse);
        assert!(s.detail.contains("could not be read"));
        let mut strict = facts(vec![thread(100, 'S')]);
        strict.threads[0].seccomp = 1;
        assert!(
            seccomp_finding(&strict, &ThreadFilters::new())
                .detail
                .contains("strict")
        );
    }
}
