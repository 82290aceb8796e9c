//! Remote calls: run a function inside a target process, on one of its
//! threads, while the other threads keep running; crash-safe.
//!
//! # How
//!
//! A [`Remote`] session owns a region mapped in the target ([`stub::Layout`]):
//! a code page (RX) with the session stub, a 1 MiB call stack and a frame
//! (RW). A call:
//!
//! 1. picks a thread (blocked in a restartable system call if possible),
//!    `PTRACE_SEIZE`s and `PTRACE_INTERRUPT`s it, reads its registers;
//! 2. writes the resume `rip` at `rsp − 136`, just under the red zone, with
//!    `process_vm_writev` (which, unlike `/proc/PID/mem`, fails on a page
//!    the program could not write: then another thread is tried); writes
//!    the frame in one piece: function, arguments, every original GPR
//!    (`rax` and `rip` adjusted so an interrupted system call restarts as
//!    the kernel would restart it, [`stub::resume_point`]), rflags,
//!    `rsp − 136`, done = 0 and the thread's tid (`OWNER`);
//! 3. `PTRACE_SETREGS` (rip = stub, rsp = frame, `orig_rax = −1`) — the
//!    last step: the frame is complete before the thread can run the stub —
//!    then `PTRACE_DETACH`es;
//! 4. polls the frame's done flag through `/proc/PID/mem` (bounded; spinning
//!    for the first 200 µs, then sleeping).
//!
//! The stub saves the extended state (XSAVE), calls, stores the result,
//! restores everything, sets done and returns with `ret 128`. If the tool
//! dies at any instant, the thread either was never changed (before
//! SETREGS) or finishes the stub on its own (after it): the kernel detaches
//! a dead tracer's tracees and resumes them. Nothing ever traps.
//!
//! # Bootstrap
//!
//! The region itself is created by one `mmap` + `mprotect` run from a
//! *cave*: zero padding after the last code byte of an executable mapping.
//! The cave stub is written with a compare-and-swap on zeros, runs two raw
//! system calls without touching the interrupted code's stack (rflags go
//! 256 bytes below rsp), writes a marker into the new region, restores the
//! registers baked into it and jumps back. Once the thread has been seen
//! outside the cave (via `/proc/PID/task/TID/syscall`, or by interrupting it
//! again), the cave is put back to zeros. [`Remote::release`] unmaps the
//! region the same way, and so does a bootstrap whose `mprotect` is
//! refused (MDWE, an LSM: then no other spot is tried) or whose stub cannot
//! be written: a failed bootstrap leaves the maps as they were.
//!
//! # Reuse
//!
//! A region outlives its session: dropping a [`Remote`] leaves it mapped
//! (and named `[anon:hotpatch-call]` where the kernel supports it), and the
//! next session, of this or a later tool, finds it in `/proc/PID/maps` and
//! takes it instead of bootstrapping (saving the cave round trips, the
//! `munmap` and reading libc's file: the functions a session needs are
//! recorded in the region). Found regions are checked byte for byte (the
//! marker, our exact stub). Two sessions never share one: each holds an
//! exclusive `flock` on a per-region file in the lock directory while it
//! lives (the kernel drops it when the tool dies). A region is taken only
//! when no call can be using its frame (see `adopt`): its done flag is 1,
//! or the thread its last call went to has exited. A tool killed between
//! writing a frame and `SETREGS` leaves done = 0 with a live thread that
//! is not in the stub; that cannot be told apart for certain from a call
//! in progress, so such a region stays unused (never wrongly reused).
//! [`remove_regions`] unmaps every idle region.
//!
//! # Limits
//!
//! - A thread interrupted in a system call that is never restarted
//!   (`epoll_wait`, `sigtimedwait`, `semop`…) sees `EINTR`; threads in
//!   restartable calls are preferred for that reason.
//! - Targets with CET shadow stacks are refused (the stub returns with
//!   `ret`).
//! - A call that never returns keeps its thread; the session is then
//!   unusable (its frame may still be in use), and so is its region for
//!   later sessions.
//! - A tool killed during the bootstrap may leave a (harmless, never
//!   executed again) stub in a cave; later bootstraps skip it.

mod load;

pub use load::{LoadedLibrary, unique_fd_path};

use super::ptrace::{Backoff, Regs, Traced};
use super::stub::{self, CaveOp, CaveRestore, Layout, SessionStub, frame};
use super::threads::{self, SyscallState};
use super::{MapEntry, Mem, ProcessError};
use crate::image::{DynSymbols, Image};
use std::ops::Range;
use std::time::{Duration, Instant};

const PROT_READ: u64 = 1;
const PROT_WRITE: u64 = 2;
const PROT_EXEC: u64 = 4;
const MAP_PRIVATE: u64 = 0x02;
const MAP_ANONYMOUS: u64 = 0x20;
const MAP_NORESERVE: u64 = 0x4000;
const MAP_FIXED_NOREPLACE: u64 = 0x10_0000;
const NR_MMAP: u64 = 9;
const NR_MPROTECT: u64 = 10;
const NR_MUNMAP: u64 = 11;
const EEXIST: i64 = 17;

/// ±2 GiB: what a `rel32` or `[rip+disp32]` reaches.
pub const REACH: u64 = (1 << 31) - 1;

const USER_MIN: u64 = 0x10000;
const USER_MAX: u64 = 0x7fff_ffff_f000;
const PAGE: u64 = 0x1000;

/// Where to put a mapping in the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    Anywhere,
    /// Every byte within ±2 GiB of this address.
    Near(u64),
}

/// What a remote call returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallOutcome {
    /// `rax` after the call.
    pub value: u64,
    /// The target's `errno` right after the call (0 when the target has no
    /// `__errno_location`). The interrupted code's `errno` is restored.
    pub errno: i32,
    /// The thread that ran it.
    pub tid: i32,
}

/// Timeouts of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// For a thread to reach the interrupt stop.
    pub stop: Duration,
    /// For a remote call to finish.
    pub call: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            stop: Duration::from_secs(2),
            call: Duration::from_secs(10),
        }
    }
}

/// The target's libc, as mapped: its dynamic symbols and load bias.
#[derive(Debug)]
pub struct TargetLibc {
    pub path: String,
    pub bias: u64,
    symbols: DynSymbols,
}

impl TargetLibc {
    /// Find the C library mapped by `pid` (glibc `libc.so.6`, or musl's
    /// `ld-musl-*.so.1`) and read its dynamic symbols from the file.
    pub fn find(pid: i32, maps: &[MapEntry]) -> Result<TargetLibc, ProcessError> {
        let images = super::maps::images(maps, pid);
        let libc = images
            .iter()
            .find(|i| crate::reserved::is_c_library(&i.path))
            .ok_or_else(|| ProcessError::SymbolNotFound {
                pid,
                name: "libc".into(),
                image: "the process's mappings (statically linked?)".into(),
            })?;
        let symbols = DynSymbols::read(&libc.open_path).map_err(|e| ProcessError::Image {
            pid,
            path: libc.open_path.clone(),
            error: Box::new(e),
        })?;
        Ok(TargetLibc {
            path: libc.path.clone(),
            bias: libc.base.wrapping_sub(symbols.link_base),
            symbols,
        })
    }

    /// The run-time address of function `name`, if libc exports it.
    pub fn function(&self, name: &str) -> Option<u64> {
        self.symbols
            .lookup(name)
            .filter(|s| s.st_type == object::elf::STT_FUNC)
            .map(|s| s.value.wrapping_add(self.bias))
    }
}

/// The libc functions a session needs on every run, recorded in the call
/// region ([`Layout::info`]) so that a later session need not read libc's
/// file (~2 MiB) again: libc does not move in a live process.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct LibcInfo {
    path: Option<String>,
    functions: Vec<(String, u64)>,
}

impl LibcInfo {
    const MAGIC: &'static [u8; 8] = b"HPLIBC01";
    fn of(libc: Option<&TargetLibc>) -> LibcInfo {
        let Some(libc) = libc else {
            return LibcInfo::default();
        };
        LibcInfo {
            path: Some(libc.path.clone()),
            // The functions the tool calls; a patch may not replace them.
            functions: crate::reserved::CALLED
                .iter()
                .filter_map(|c| Some((c.name.to_string(), libc.function(c.name)?)))
                .collect(),
        }
    }

    fn get(&self, name: &str) -> Option<u64> {
        self.functions.iter().find(|(n, _)| n == name).map(|&(_, a)| a)
    }

    /// The record in the region, if it holds a valid one.
    fn read(mem: &Mem, layout: &Layout) -> Option<LibcInfo> {
        let head = mem.read(layout.info(), 12).ok()?;
        if &head[..8] != Self::MAGIC {
            return None;
        }
        let len = u32::from_le_bytes(head[8..12].try_into().ok()?) as u64;
        if len > stub::INFO_SIZE - 12 {
            return None;
        }
        let json = mem.read(layout.info() + 12, len as usize).ok()?;
        serde_json::from_slice(&json).ok()
    }

    fn write(&self, mem: &Mem, layout: &Layout) -> Result<(), ProcessError> {
        let json = serde_json::to_vec(self).unwrap_or_default();
        if json.len() as u64 > stub::INFO_SIZE - 12 {
            return Ok(());
        }
        let mut bytes = Self::MAGIC.to_vec();
        bytes.extend_from_slice(&(json.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&json);
        mem.write(layout.info(), &bytes)
    }
}

/// A remote-call session with one target process. Calls are serialised;
/// after a call times out the session refuses further calls (its thread
/// may still be inside the stub).
///
/// The session's region stays mapped in the target when the session is
/// dropped, for the next session (of this or a later tool) to reuse;
/// [`Remote::release`] unmaps it.
#[derive(Debug)]
pub struct Remote {
    pid: i32,
    mem: Mem,
    layout: Layout,
    stub: SessionStub,
    /// The target's libc, read from its file when first needed.
    libc: std::cell::OnceCell<Option<TargetLibc>>,
    /// libc functions known without reading the file (recorded in the
    /// region by the session that made it, see [`LibcInfo`]).
    libc_known: LibcInfo,
    errno_fn: u64,
    timeouts: Timeouts,
    poisoned: Option<String>,
    /// Run calls on this thread only.
    pinned: Option<i32>,
    /// Calls made: seeds the choice among equally good threads.
    calls: u64,
    /// Held while the session lives: no other session uses the region.
    _lock: super::lock::Lock,
    /// Whether the region was found in the target (made by an earlier
    /// session) rather than made by this one.
    reused: bool,
    /// Libraries this session loaded by content, by handle: their load
    /// bias and exported symbols, read from the very bytes loaded.
    loaded: std::collections::HashMap<u64, (u64, DynSymbols)>,
}

/// The fixed parts of a session being opened.
#[derive(Clone, Copy)]
struct Session {
    pid: i32,
    timeouts: Timeouts,
}

impl Session {
    /// The session on the region at `layout`; its libc functions from the
    /// region's record if it holds a valid one, else from the file (and
    /// recorded for the next session).
    fn into_remote(
        self,
        mem: Mem,
        layout: Layout,
        stub: SessionStub,
        lock: super::lock::Lock,
        reused: bool,
        maps: Vec<MapEntry>,
    ) -> Remote {
        let pid = self.pid;
        let recorded = if reused {
            LibcInfo::read(&mem, &layout)
        } else {
            None
        };
        let libc = std::cell::OnceCell::new();
        let known = match recorded {
            Some(info) => info,
            None => {
                let found = TargetLibc::find(pid, &maps).ok();
                let info = LibcInfo::of(found.as_ref());
                if let Err(e) = info.write(&mem, &layout) {
                    tracing::debug!(pid, error = %e, "could not record libc in the call region");
                }
                let _ = libc.set(found);
                info
            }
        };
        let errno_fn = known.get("__errno_location").unwrap_or(0);
        Remote {
            pid,
            mem,
            layout,
            stub,
            libc,
            libc_known: known,
            errno_fn,
            timeouts: self.timeouts,
            poisoned: None,
            pinned: None,
            calls: 0,
            _lock: lock,
            reused,
            loaded: std::collections::HashMap::new(),
        }
    }
}

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

fn check_supported(pid: i32) -> Result<(), ProcessError> {
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
fn lock_region(pid: i32, started: u64, base: u64) -> Result<Option<super::lock::Lock>, ProcessError> {
    match super::lock::lock_region(pid, started, base)? {
        super::lock::Taken::Locked(l) => Ok(Some(l)),
        super::lock::Taken::Busy(_) => Ok(None),
    }
}

/// The bases of what look like call regions in `maps`: an anonymous
/// private r-x page directly followed by an anonymous private rw-
/// mapping that covers the rest of a [`Layout`]. (Only a look: the
/// contents are checked by [`adopt`].)
fn region_bases(maps: &[MapEntry], xsave: u64) -> Vec<u64> {
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
fn placed(layout: &Layout, placement: Placement) -> bool {
    match placement {
        Placement::Anywhere => true,
        Placement::Near(a) => layout.base.abs_diff(a) <= REACH && layout.end().abs_diff(a) <= REACH,
    }
}

/// How long a new session waits for the last call in a region to finish
/// (a tool killed mid-call) before it makes a region of its own: when the
/// call's thread is seen in the region, and when it is running (where it
/// is would take an interrupt to know).
const ADOPT_WAIT: Duration = Duration::from_millis(20);
const ADOPT_WAIT_RUNNING: Duration = Duration::from_millis(2);

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
fn adopt(mem: &Mem, layout: &Layout, timeouts: Timeouts) -> Result<Option<SessionStub>, ProcessError> {
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
    loop {
        let done = mem.read_u32(frame_at + frame::DONE)?;
        if done == 1 || owner == 0 || !threads::thread_exists(pid, owner as i32) {
            break;
        }
        let wait = match owner_in_region(pid, owner as i32, layout) {
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
fn owner_in_region(pid: i32, tid: i32, layout: &Layout) -> Option<bool> {
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
    let maps = super::Process::open(pid)?.maps()?;
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
    while let Some(remote) = Remote::open(pid, Placement::Anywhere, Timeouts::default(), false)? {
        remote.release()?;
        removed += 1;
    }
    Ok(removed)
}

impl Remote {
    /// Open a session: reuse a call region left in the target by an earlier
    /// session if there is an idle one placed as asked, else map one
    /// (through a cave, see the module docs) and put the session stub in it.
    pub fn attach(pid: i32, placement: Placement) -> Result<Remote, ProcessError> {
        Self::attach_with(pid, placement, Timeouts::default())
    }

    pub fn attach_with(pid: i32, placement: Placement, timeouts: Timeouts) -> Result<Remote, ProcessError> {
        Self::open(pid, placement, timeouts, true)?.ok_or(ProcessError::NoSuchProcess { pid })
    }

    /// Like [`Remote::attach_with`]; with `create` false, only an existing
    /// idle region is taken (`None` if there is none).
    fn open(
        pid: i32,
        placement: Placement,
        timeouts: Timeouts,
        create: bool,
    ) -> Result<Option<Remote>, ProcessError> {
        let t0 = Instant::now();
        if pid <= 0 {
            return Err(ProcessError::NoSuchProcess { pid });
        }
        let maps = super::Process { pid }.maps()?;
        check_supported(pid)?;
        let mem = Mem::open(pid)?;
        let xsave = xsave_size();
        let size = Layout::size_for(xsave);
        let started = super::lock::start_time(pid)?;
        let session = Session { pid, timeouts };
        // An idle region left by an earlier session.
        for base in region_bases(&maps, xsave) {
            let layout = Layout::new(base, xsave);
            if !placed(&layout, placement) {
                continue;
            }
            let Some(lock) = lock_region(pid, started, base)? else {
                tracing::debug!(pid, base, "call region in use by another session");
                continue;
            };
            if let Some(stub) = adopt(&mem, &layout, timeouts)? {
                let r = session.into_remote(mem, layout, stub, lock, true, maps);
                tracing::debug!(
                    pid,
                    base,
                    us = t0.elapsed().as_micros() as u64,
                    "attach: reused the call region"
                );
                return Ok(Some(r));
            }
        }
        if !create {
            return Ok(None);
        }
        let spots = free_spots(&maps, size, placement);
        if spots.is_empty() {
            return Err(ProcessError::Unsupported {
                pid,
                what: format!("no free {size:#x}-byte gap in the address space for {placement:?}"),
            });
        }
        let mut last_err = None;
        for base in spots.into_iter().take(4) {
            // Locked before it exists: nobody adopts it half made.
            let Some(lock) = lock_region(pid, started, base)? else {
                continue;
            };
            let layout = Layout::new(base, xsave);
            match bootstrap(&mem, &layout, timeouts) {
                Ok(()) => {
                    let stub = match install_stub(&mem, &layout) {
                        Ok(stub) => stub,
                        Err(e) => return Err(unmap_failed(&mem, &layout, timeouts, e)),
                    };
                    let mut r = session.into_remote(mem, layout, stub, lock, false, maps);
                    r.name_region();
                    tracing::debug!(
                        pid,
                        base,
                        us = t0.elapsed().as_micros() as u64,
                        "attach: mapped a call region"
                    );
                    return Ok(Some(r));
                }
                Err(e @ ProcessError::CallFailed { .. }) => {
                    tracing::debug!(pid, base, error = %e, "bootstrap mmap failed; next spot");
                    last_err = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or(ProcessError::NoSuchProcess { pid }))
    }

    /// Name the region in `/proc/PID/maps` ([`REGION_NAME`]); kernels
    /// without `CONFIG_ANON_VMA_NAME` refuse, which only costs the name.
    fn name_region(&mut self) {
        const PR_SET_VMA: u64 = 0x5356_4d41;
        const PR_SET_VMA_ANON_NAME: u64 = 0;
        const NR_PRCTL: u64 = 157;
        let mut name = REGION_NAME.as_bytes().to_vec();
        name.push(0);
        let r = self.write_scratch(&name).and_then(|at| {
            self.syscall(
                NR_PRCTL,
                &[
                    PR_SET_VMA,
                    PR_SET_VMA_ANON_NAME,
                    self.layout.base,
                    self.layout.size(),
                    at,
                ],
            )
        });
        match r {
            Ok(0) => {}
            other => tracing::debug!(pid = self.pid, ?other, "could not name the call region"),
        }
    }

    /// Whether this session reuses a region an earlier session left.
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// Trips into the target so far: each remote call, plus the bootstrap
    /// (one run of the cave) if this session made its region.
    pub fn trips(&self) -> u64 {
        self.calls + u64::from(!self.reused)
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The region this session mapped in the target.
    pub fn region(&self) -> Range<u64> {
        self.layout.base..self.layout.end()
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn mem(&self) -> &Mem {
        &self.mem
    }

    /// The target's libc (read from its file on first use).
    pub fn libc(&self) -> Option<&TargetLibc> {
        self.libc
            .get_or_init(|| {
                let maps = super::Process { pid: self.pid }.maps().ok()?;
                TargetLibc::find(self.pid, &maps).ok()
            })
            .as_ref()
    }

    pub fn set_timeouts(&mut self, t: Timeouts) {
        self.timeouts = t;
    }

    /// Run the following calls on thread `tid` only (if it is usable), or
    /// on the best thread again (`None`).
    pub fn pin_thread(&mut self, tid: Option<i32>) {
        self.pinned = tid;
    }

    /// Unmap the session's region from the target (through a cave: code
    /// cannot unmap the page it runs from). Refused while a call may still
    /// be running in it (after a timeout): then the region stays.
    pub fn release(self) -> Result<(), ProcessError> {
        if let Some(why) = &self.poisoned {
            return Err(ProcessError::Poisoned {
                pid: self.pid,
                why: why.clone(),
            });
        }
        // The last call's thread may still be at the final `ret 128`.
        let ret = self.stub.ret_ip..self.stub.ret_ip + 3;
        for t in threads::threads(self.pid)? {
            if !left(self.pid, t.tid, &ret, self.timeouts.call)? {
                return Err(ProcessError::Timeout {
                    pid: self.pid,
                    tid: t.tid,
                    what: "waiting for the last call to leave the stub".into(),
                    after: self.timeouts.call,
                });
            }
        }
        unmap_through_cave(&self.mem, self.region(), self.timeouts)
    }

    /// The address of function `name` in the target's libc.
    pub fn libc_function(&self, name: &str) -> Result<u64, ProcessError> {
        if let Some(address) = self.libc_known.get(name) {
            return Ok(address);
        }
        let libc = self.libc().ok_or_else(|| ProcessError::SymbolNotFound {
            pid: self.pid,
            name: name.into(),
            image: "libc (none mapped)".into(),
        })?;
        libc.function(name).ok_or_else(|| ProcessError::SymbolNotFound {
            pid: self.pid,
            name: name.into(),
            image: libc.path.clone(),
        })
    }

    /// Call `function(args…)` (at most 6 integer arguments) in the target
    /// and return `rax`.
    pub fn call(&mut self, function: u64, args: &[u64]) -> Result<u64, ProcessError> {
        Ok(self.call_full(function, args, 0)?.value)
    }

    /// Raw system call `nr(args…)` in the target (at most 6 arguments);
    /// returns the kernel's result: `-errno` on failure. errno is untouched.
    pub fn syscall(&mut self, nr: u64, args: &[u64]) -> Result<i64, ProcessError> {
        let helper = self.stub.syscall_helper;
        Ok(self.call_full(helper, args, nr)?.value as i64)
    }

    /// Like [`Remote::syscall`], failing with the errno's name on `-errno`.
    pub fn syscall_ok(&mut self, what: &str, nr: u64, args: &[u64]) -> Result<u64, ProcessError> {
        let r = self.syscall(nr, args)?;
        if (-4095..0).contains(&r) {
            return Err(ProcessError::CallFailed {
                pid: self.pid,
                what: what.into(),
                detail: std::io::Error::from_raw_os_error(-r as i32).to_string(),
            });
        }
        Ok(r as u64)
    }

    /// Copy `bytes` into the session's scratch area; returns its address.
    /// Valid until the next call to this function.
    pub fn write_scratch(&mut self, bytes: &[u8]) -> Result<u64, ProcessError> {
        if bytes.len() as u64 > stub::SCRATCH_SIZE {
            return Err(ProcessError::Unsupported {
                pid: self.pid,
                what: format!(
                    "{} bytes do not fit the {} scratch bytes",
                    bytes.len(),
                    stub::SCRATCH_SIZE
                ),
            });
        }
        self.mem.write(self.layout.scratch(), bytes)?;
        Ok(self.layout.scratch())
    }

    fn c_string(&mut self, s: &str) -> Result<u64, ProcessError> {
        if s.as_bytes().contains(&0) {
            return Err(ProcessError::Unsupported {
                pid: self.pid,
                what: format!("{s:?} contains a NUL byte"),
            });
        }
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.write_scratch(&b)
    }

    /// `dlerror()` on thread `tid`: the message is per thread.
    fn dlerror(&mut self, tid: i32) -> String {
        let pinned = self.pinned.replace(tid);
        let msg = self
            .libc_function("dlerror")
            .and_then(|f| self.call(f, &[]))
            .and_then(|p| {
                if p == 0 {
                    Ok(String::new())
                } else {
                    self.mem.read_c_string(p, 4096)
                }
            });
        self.pinned = pinned;
        match msg {
            Ok(m) if !m.is_empty() => m,
            Ok(_) => "dlerror() says nothing".into(),
            Err(e) => format!("dlerror() failed: {e}"),
        }
    }

    /// `dlopen(path, flags)` in the target; the handle, or the `dlerror()`
    /// message.
    pub fn dlopen(&mut self, path: &str, flags: i32) -> Result<u64, ProcessError> {
        let f = self.libc_function("dlopen")?;
        let p = self.c_string(path)?;
        let out = match self.call_full(f, &[p, flags as u32 as u64], 0) {
            Ok(out) => out,
            Err(ProcessError::Timeout { pid, tid, after, .. }) => {
                return Err(ProcessError::Timeout {
                    pid,
                    tid,
                    after,
                    what: format!(
                        "waiting for dlopen({path:?}) to return: the patch's constructors (or the \
                         loader) did not return; thread {tid} is held inside that call until they \
                         do (its call region stays reserved for it)"
                    ),
                });
            }
            Err(e) => return Err(e),
        };
        let handle = out.value;
        if handle == 0 {
            let detail = self.dlerror(out.tid);
            return Err(ProcessError::CallFailed {
                pid: self.pid,
                what: format!("dlopen({path:?})"),
                detail,
            });
        }
        Ok(handle)
    }

    /// `dlsym(handle, name)` in the target.
    pub fn dlsym(&mut self, handle: u64, name: &str) -> Result<u64, ProcessError> {
        let f = self.libc_function("dlsym")?;
        let p = self.c_string(name)?;
        let out = self.call_full(f, &[handle, p], 0)?;
        let addr = out.value;
        if addr == 0 {
            let detail = self.dlerror(out.tid);
            return Err(ProcessError::CallFailed {
                pid: self.pid,
                what: format!("dlsym({name:?})"),
                detail,
            });
        }
        Ok(addr)
    }

    /// `dlsym(handle, name)` for every name, in order. Names the loaded
    /// file itself exports plainly (see `DynSymbols::dlsym_address`) are
    /// read from the file and the load bias in the handle's link map
    /// (glibc's handle is its `struct link_map`; musl's `struct dso` starts
    /// the same way: `l_addr`, `l_name`, `l_ld`), with no remote call; the
    /// rest go through `dlsym` in the target.
    pub fn dlsym_many(&mut self, handle: u64, names: &[&str]) -> Result<Vec<u64>, ProcessError> {
        let loaded = match self.loaded.remove(&handle) {
            Some(known) => Some(known),
            None => self.loaded_symbols(handle),
        };
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            match loaded
                .as_ref()
                .and_then(|(bias, syms)| syms.dlsym_address(*bias, name))
            {
                Some(address) => out.push(address),
                None => out.push(self.dlsym(handle, name)?),
            }
        }
        if let Some(known) = loaded {
            self.loaded.insert(handle, known);
        }
        Ok(out)
    }

    /// The load bias and exported symbols of the object `handle` (from
    /// `dlopen`) stands for, if its link map and file agree: the file's
    /// first mapping at `l_addr` plus its link base, its `PT_DYNAMIC` at
    /// `l_ld`.
    fn loaded_symbols(&mut self, handle: u64) -> Option<(u64, DynSymbols)> {
        let head = self.mem.read(handle, 24).ok()?;
        let word = |i: usize| u64::from_le_bytes(head[8 * i..8 * i + 8].try_into().expect("8 bytes"));
        let (l_addr, l_name, l_ld) = (word(0), word(1), word(2));
        let name = self.mem.read_c_string(l_name, 4096).ok()?;
        let maps = super::Process { pid: self.pid }.maps().ok()?;
        let images = super::maps::images(&maps, self.pid);
        let image = images
            .iter()
            .filter(|i| i.path == name)
            .min_by_key(|i| i.base != l_addr)?;
        let syms = DynSymbols::read(&image.open_path).ok()?;
        let same = image.base == l_addr.wrapping_add(syms.link_base)
            && syms.dynamic.map(|d| d.wrapping_add(l_addr)) == Some(l_ld);
        if !same {
            tracing::debug!(
                pid = self.pid,
                handle,
                name,
                "link map and file disagree; dlsym for each name"
            );
            return None;
        }
        Some((l_addr, syms))
    }

    /// Map `len` bytes of anonymous memory with `prot` in the target, placed
    /// as asked (`MAP_FIXED_NOREPLACE` at free spots from its maps).
    pub fn mmap(&mut self, placement: Placement, len: u64, prot: u64) -> Result<u64, ProcessError> {
        let len = len.next_multiple_of(PAGE);
        let maps = super::Process::open(self.pid)?.maps()?;
        let flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE;
        for addr in free_spots(&maps, len, placement).into_iter().take(8) {
            let r = self.syscall(NR_MMAP, &[addr, len, prot, flags, u64::MAX, 0])?;
            if r == addr as i64 {
                return Ok(addr);
            }
            if r == -EEXIST {
                continue; // someone mapped it since we read the maps
            }
            if r >= 0 {
                // A kernel without MAP_FIXED_NOREPLACE treats it as a hint.
                let _ = self.syscall(NR_MUNMAP, &[r as u64, len]);
                continue;
            }
            return Err(ProcessError::CallFailed {
                pid: self.pid,
                what: format!("mmap({addr:#x}, {len:#x})"),
                detail: std::io::Error::from_raw_os_error(-r as i32).to_string(),
            });
        }
        Err(ProcessError::Unsupported {
            pid: self.pid,
            what: format!("no free {len:#x}-byte spot for {placement:?}"),
        })
    }

    /// Call `function` on a thread of the target; `nr` is the system call
    /// number for the syscall helper (ignored otherwise).
    pub fn call_full(&mut self, function: u64, args: &[u64], nr: u64) -> Result<CallOutcome, ProcessError> {
        if let Some(why) = &self.poisoned {
            return Err(ProcessError::Poisoned {
                pid: self.pid,
                why: why.clone(),
            });
        }
        if args.len() > 6 {
            return Err(ProcessError::Unsupported {
                pid: self.pid,
                what: format!("{} arguments (at most 6)", args.len()),
            });
        }
        let mut a = [0u64; 6];
        a[..args.len()].copy_from_slice(args);
        let t0 = Instant::now();
        let frame_at = self.layout.frame();
        let (entry, errno_fn) = (self.stub.entry, self.errno_fn);
        let mut committed = false;
        let choice = Choice {
            pinned: self.pinned,
            seed: spread_seed(self.calls),
        };
        let hijacked = hijack(
            self.pid,
            &self.mem,
            self.timeouts,
            choice,
            None,
            &mut committed,
            &mut |regs, _, tid| {
                let (rip, rax) = stub::resume_point(regs.rip, regs.rax, regs.orig_rax);
                let ret_rsp = regs.rsp.wrapping_sub(stub::RED_ZONE + 8);
                // The whole frame in one write: DONE = 0 and OWNER from here
                // on (see `adopt`), the bootstrap marker as it was.
                let mut f = vec![0u8; frame::XSAVE as usize];
                let mut put = |off: u64, v: u64| {
                    f[off as usize..off as usize + 8].copy_from_slice(&v.to_le_bytes());
                };
                put(frame::FN, function);
                for (i, v) in a.iter().enumerate() {
                    put(frame::ARGS + 8 * i as u64, *v);
                }
                put(frame::ERRNO_FN, errno_fn);
                put(frame::RET_RSP, ret_rsp);
                put(frame::RFLAGS, regs.eflags);
                let gprs = [
                    rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi, regs.rbp, regs.r8, regs.r9,
                    regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
                ];
                for (i, v) in gprs.into_iter().enumerate() {
                    put(frame::GPRS + 8 * i as u64, v);
                }
                put(frame::NR, nr);
                put(frame::BOOT, u64::from(stub::BOOT_MAGIC));
                put(frame::OWNER, tid as u64);
                let mut new = *regs;
                new.rip = entry;
                new.rsp = frame_at;
                new.orig_rax = u64::MAX;
                Some(Hijack {
                    // The resume rip goes where the program itself could write
                    // it (the write is the check that this stack is usable).
                    stack: Some((ret_rsp, rip)),
                    writes: vec![(frame_at, f)],
                    regs: new,
                })
            },
        );
        let tid = match hijacked {
            Ok(tid) => tid,
            Err(e) => {
                if committed {
                    // A thread may run the stub with this frame: no other
                    // call may write it until that is known to be over.
                    self.poisoned = Some(format!("a thread was sent into the stub, then: {e}"));
                }
                return Err(e);
            }
        };
        self.calls += 1;
        // The thread is on its own now. Wait for done.
        let done_at = frame_at + frame::DONE;
        let start = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(1));
        loop {
            match self.mem.read_u32(done_at) {
                Ok(1) => break,
                Ok(_) => {}
                Err(e) => return Err(self.gone_or(tid, e, "during the remote call")),
            }
            if start.elapsed() >= self.timeouts.call {
                if !threads::thread_exists(self.pid, tid) {
                    return Err(self.gone_or(tid, ProcessError::NoSuchThread { pid: self.pid, tid }, ""));
                }
                let what = format!("waiting for the remote call of {function:#x} to return");
                self.poisoned = Some(format!("thread {tid} may still be running a call ({what})"));
                return Err(ProcessError::Timeout {
                    pid: self.pid,
                    tid,
                    what,
                    after: self.timeouts.call,
                });
            }
            backoff.pause();
        }
        let value = self.mem.read_u64(self.layout.frame() + frame::RESULT)?;
        let errno = self.mem.read_u64(self.layout.frame() + frame::ERRNO_AFTER)? as i32;
        tracing::debug!(
            pid = self.pid,
            tid,
            function,
            nr,
            hijack_us = (start - t0).as_micros() as u64,
            wait_us = start.elapsed().as_micros() as u64,
            "remote call"
        );
        Ok(CallOutcome { value, errno, tid })
    }

    fn gone_or(&self, tid: i32, e: ProcessError, during: &str) -> ProcessError {
        let during = if during.is_empty() {
            "during the remote call"
        } else {
            during
        };
        if !std::path::Path::new(&format!("/proc/{}/stat", self.pid)).exists()
            || !threads::thread_exists(self.pid, tid)
        {
            return ProcessError::Exited {
                pid: self.pid,
                tid,
                during: during.into(),
            };
        }
        e
    }
}

/// Which thread to take.
#[derive(Debug, Clone, Copy, Default)]
struct Choice {
    pinned: Option<i32>,
    seed: u64,
}

/// A seed for [`threads::pick_spread`]: the call counter mixed with the
/// clock (splitmix64), so choices do not follow the caller's patterns.
fn spread_seed(calls: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let mut z = calls.wrapping_add(nanos).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What to do to a stopped thread to start a call.
struct Hijack {
    /// A word to write on the thread's stack first, with the program's own
    /// access rights (`process_vm_writev`: no write into a read-only or
    /// guard page); when refused, another thread is tried.
    stack: Option<(u64, u64)>,
    /// Memory writes, done before SETREGS.
    writes: Vec<(u64, Vec<u8>)>,
    regs: Regs,
}

/// The plan of a hijack: the stopped thread's registers, the target's
/// maps (if the hijack was given maps; else empty) and the thread's tid →
/// what to do, or `None` (try another thread).
type Plan<'a> = dyn FnMut(&Regs, &[MapEntry], i32) -> Option<Hijack> + 'a;

/// Seize a thread, let `plan` turn its registers into the writes and
/// registers that start a call (or `None`: pick another thread), write,
/// SETREGS, detach. Returns the tid. `committed` is
/// set once a SETREGS succeeded: from then on the thread runs the stub,
/// whatever happens to this tool.
fn hijack(
    pid: i32,
    mem: &Mem,
    timeouts: Timeouts,
    choice: Choice,
    maps: Option<&[MapEntry]>,
    committed: &mut bool,
    plan: &mut Plan<'_>,
) -> Result<i32, ProcessError> {
    let mut excluded: Vec<i32> = Vec::new();
    let mut last_err = None;
    for _attempt in 0..4 {
        let t0 = Instant::now();
        let all = threads::threads(pid)?;
        let candidates: Vec<_> = all
            .iter()
            .filter(|t| !excluded.contains(&t.tid) && choice.pinned.is_none_or(|p| p == t.tid))
            .cloned()
            .collect();
        let Some(t) = threads::pick_spread(&candidates, choice.seed).cloned() else {
            break;
        };
        let t_threads = t0.elapsed();
        let mut traced = match Traced::seize(pid, t.tid) {
            Ok(tr) => tr,
            Err(ProcessError::NoSuchThread { .. }) => {
                excluded.push(t.tid);
                continue;
            }
            Err(e) => return Err(e),
        };
        match traced.interrupt(timeouts.stop) {
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
        traced.detach()?;
        tracing::trace!(
            pid,
            tid = t.tid,
            threads = ?t_threads,
            interrupt = ?t_int,
            all = ?t0.elapsed(),
            "hijacked"
        );
        return Ok(t.tid);
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
fn write_as_program(pid: i32, addr: u64, value: u64) -> Result<bool, ProcessError> {
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
fn writable(maps: &[MapEntry], addr: u64, len: u64) -> bool {
    maps.iter()
        .any(|m| m.writable && m.start <= addr && addr.checked_add(len).is_some_and(|e| e <= m.end))
}

/// Run the cave bootstrap once at `layout.base`: `mmap` RW, `mprotect` the
/// code page RX, marker. `CallFailed` when the mmap failed (try elsewhere).
fn bootstrap(mem: &Mem, layout: &Layout, timeouts: Timeouts) -> Result<(), ProcessError> {
    let pid = mem.pid();
    let op = CaveOp {
        nr: NR_MMAP,
        args: [
            layout.base,
            layout.size(),
            PROT_READ | PROT_WRITE,
            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE,
            u64::MAX,
            0,
        ],
        then: Some((NR_MPROTECT, [layout.base, stub::CODE_SIZE, PROT_READ | PROT_EXEC])),
        marker: Some(layout.frame() + frame::BOOT),
    };
    let marker_at = layout.frame() + frame::BOOT;
    let probe = || {
        mem.read_u64(marker_at)
            .ok()
            .filter(|m| *m as u32 == stub::BOOT_MAGIC)
    };
    match run_cave(mem, &op, timeouts, &probe)? {
        Some(m) if m >> 32 == 0 => Ok(()),
        Some(m) => {
            // Mapped, but it cannot hold code: nowhere else will either
            // (MDWE and LSMs refuse per process), so unmap it and stop.
            let errno = -((m >> 32) as u32 as i32);
            let refused = ProcessError::Unsupported {
                pid,
                what: format!(
                    "mprotect({:#x}, PROT_READ|PROT_EXEC) of the new remote-call region failed: {}: \
                     the process may not make memory executable (MDWE, set with prctl \
                     PR_SET_MDWE, or an LSM policy)",
                    layout.base,
                    std::io::Error::from_raw_os_error(errno)
                ),
            };
            Err(unmap_failed(mem, layout, timeouts, refused))
        }
        None => Err(ProcessError::CallFailed {
            pid,
            what: format!(
                "mmap({:#x}, {:#x}) for the remote-call region",
                layout.base,
                layout.size()
            ),
            detail: "no marker: the address was taken, or mmap is refused".into(),
        }),
    }
}

/// The session stub, written into the code page of a freshly bootstrapped
/// region, and the frame marked idle.
fn install_stub(mem: &Mem, layout: &Layout) -> Result<SessionStub, ProcessError> {
    let stub = stub::session_stub(layout).map_err(|e| ProcessError::Unsupported {
        pid: mem.pid(),
        what: format!("assembling the stub: {e}"),
    })?;
    let zeros = vec![0u8; stub.bytes.len()];
    mem.write_expecting(layout.code(), &zeros, &stub.bytes)?;
    mem.write_u32(layout.frame() + frame::DONE, 1)?;
    Ok(stub)
}

/// `munmap` of `region` run from a cave (code cannot unmap the page it
/// runs from); done once the region is gone from the maps.
fn unmap_through_cave(mem: &Mem, region: Range<u64>, timeouts: Timeouts) -> Result<(), ProcessError> {
    let pid = mem.pid();
    let op = CaveOp {
        nr: NR_MUNMAP,
        args: [region.start, region.end - region.start, 0, 0, 0, 0],
        then: None,
        marker: None,
    };
    let gone = || {
        let maps = super::Process::open(pid).and_then(|p| p.maps()).ok()?;
        (!maps.iter().any(|m| m.start < region.end && region.start < m.end)).then_some(0)
    };
    match run_cave(mem, &op, timeouts, &gone)? {
        Some(_) => Ok(()),
        None => Err(ProcessError::CallFailed {
            pid,
            what: format!("munmap({:#x}, {:#x})", region.start, region.end - region.start),
            detail: "the region is still mapped".into(),
        }),
    }
}

/// A region was mapped and then `error` stopped its set-up: unmap it, so
/// that the process's maps are as they were, and return `error` saying
/// so (or that the region stays, if unmapping failed too).
fn unmap_failed(mem: &Mem, layout: &Layout, timeouts: Timeouts, error: ProcessError) -> ProcessError {
    let pid = mem.pid();
    let region = layout.base..layout.end();
    let what = match unmap_through_cave(mem, region.clone(), timeouts) {
        Ok(()) => "was unmapped again: nothing is left in the process".to_string(),
        Err(e) => format!(
            "could not be unmapped ({e}): {:#x}-{:#x} stays mapped, unused",
            region.start, region.end
        ),
    };
    ProcessError::Unsupported {
        pid,
        what: format!(
            "{}; the call region {what}",
            error.to_string().trim_start_matches(&format!("process {pid}: "))
        ),
    }
}

/// Run `op` from a cave on some thread; `probe` says whether it succeeded
/// (and with what). Returns once the thread has left the cave and the cave
/// is zero again; `None` if the thread left without `probe` seeing success.
fn run_cave(
    mem: &Mem,
    op: &CaveOp,
    timeouts: Timeouts,
    probe: &dyn Fn() -> Option<u64>,
) -> Result<Option<u64>, ProcessError> {
    let pid = mem.pid();
    let t0 = Instant::now();
    let maps = super::Process::open(pid)?.maps()?;
    let cave = find_cave(pid, mem, &maps, stub::CAVE_MAX)?;
    tracing::debug!(pid, cave, us = t0.elapsed().as_micros() as u64, "cave found");
    let mut written: Option<Vec<u8>> = None;
    let mut asm_err = None;
    let mut committed = false;
    let result = hijack(
        pid,
        mem,
        timeouts,
        Choice::default(),
        Some(&maps),
        &mut committed,
        &mut |regs, maps, _| {
            // rflags go to rsp − 264, under the red zone.
            if !writable(maps, regs.rsp.wrapping_sub(stub::CAVE_STACK_DROP + 8), 8) {
                return None;
            }
            let (rip, rax) = stub::resume_point(regs.rip, regs.rax, regs.orig_rax);
            let restore = CaveRestore {
                rax,
                rcx: regs.rcx,
                r11: regs.r11,
                rdi: regs.rdi,
                rsi: regs.rsi,
                rdx: regs.rdx,
                r10: regs.r10,
                r8: regs.r8,
                r9: regs.r9,
                rip,
            };
            let bytes = match stub::cave_stub(cave, op, &restore) {
                Ok(b) => b,
                Err(e) => {
                    asm_err = Some(e.to_string());
                    return None;
                }
            };
            // Claim the cave: compare-and-swap on zeros (another tool may be
            // bootstrapping too).
            if let Err(e) = mem.write_expecting(cave, &vec![0; bytes.len()], &bytes) {
                tracing::debug!(pid, cave, error = %e, "cave taken");
                return None;
            }
            written = Some(bytes);
            let mut new = *regs;
            new.rip = cave;
            new.rax = op.nr;
            new.rdi = op.args[0];
            new.rsi = op.args[1];
            new.rdx = op.args[2];
            new.r10 = op.args[3];
            new.r8 = op.args[4];
            new.r9 = op.args[5];
            new.orig_rax = u64::MAX;
            Some(Hijack {
                stack: None,
                writes: Vec::new(),
                regs: new,
            })
        },
    );
    let tid = match result {
        Ok(tid) => tid,
        Err(e) => {
            // If the cave was written, it stays written: whether the thread
            // was already sent into it (SETREGS done, DETACH failed) is not
            // known here, and dead code in padding is harmless.
            if let Some(a) = asm_err {
                return Err(ProcessError::Unsupported {
                    pid,
                    what: format!("assembling the cave stub: {a}"),
                });
            }
            return Err(e);
        }
    };
    let Some(bytes) = written else {
        return Err(ProcessError::NoUsableThread {
            pid,
            why: "no thread to run the bootstrap".into(),
        });
    };
    let cave_range = cave..cave + bytes.len() as u64;
    // Wait for success (or for the thread to have left the cave without
    // it: the system call failed).
    let start = Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(1));
    let marker = loop {
        if let Some(m) = probe() {
            break Some(m);
        }
        if start.elapsed() > Duration::from_millis(200) && left(pid, tid, &cave_range, Duration::ZERO)? {
            // Out of the cave and no success: look once more (it may have
            // landed in between), else the call failed.
            break probe();
        }
        if start.elapsed() >= timeouts.call {
            return Err(ProcessError::Timeout {
                pid,
                tid,
                what: "waiting for the cave stub (the cave stays written)".into(),
                after: timeouts.call,
            });
        }
        backoff.pause();
    };
    // The marker is written before the last few instructions: wait until
    // the thread is out, then put the cave back.
    if !left(pid, tid, &cave_range, timeouts.call)? {
        return Err(ProcessError::Timeout {
            pid,
            tid,
            what: "waiting for the thread to leave the cave (it stays written)".into(),
            after: timeouts.call,
        });
    }
    mem.write_expecting(cave, &bytes, &vec![0; bytes.len()])?;
    tracing::debug!(pid, us = t0.elapsed().as_micros() as u64, "cave op done");
    Ok(marker)
}

/// Whether thread `tid` has left `range` (or exited), waiting up to
/// `timeout`. First from `/proc/PID/task/TID/syscall` (a blocked thread's
/// pc, no interruption); a thread that keeps running is interrupted and
/// its rip read.
fn left(pid: i32, tid: i32, range: &Range<u64>, timeout: Duration) -> Result<bool, ProcessError> {
    let start = Instant::now();
    let mut polls = 0u32;
    loop {
        let info = match threads::thread_info(pid, tid) {
            Ok(i) => i,
            Err(ProcessError::NoSuchThread { .. } | ProcessError::NoSuchProcess { .. }) => return Ok(true),
            Err(e) => return Err(e),
        };
        if matches!(info.state, 'Z' | 'X') {
            return Ok(true);
        }
        match info.syscall.pc() {
            Some(pc) if !range.contains(&pc) && info.syscall != SyscallState::Unknown => return Ok(true),
            Some(_) => {}
            None => {
                polls += 1;
                if polls >= 3 || timeout.is_zero() {
                    // Running: look at its rip.
                    let mut t = match Traced::seize(pid, tid) {
                        Ok(t) => t,
                        Err(ProcessError::NoSuchThread { .. }) => return Ok(true),
                        Err(e) => return Err(e),
                    };
                    match t.interrupt(Duration::from_secs(2)) {
                        Ok(()) => {}
                        Err(ProcessError::Exited { .. }) => return Ok(true),
                        Err(e) => return Err(e),
                    }
                    let rip = t.regs()?.rip;
                    t.detach()?;
                    if !range.contains(&rip) {
                        return Ok(true);
                    }
                    polls = 0;
                }
            }
        }
        if start.elapsed() >= timeout {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// A code cave: at least `need` zero bytes after the last file byte of an
/// executable segment of a mapped ELF image, inside its last page, covered
/// by no symbol. Returns its address (16-aligned).
pub fn find_cave(pid: i32, mem: &Mem, maps: &[MapEntry], need: usize) -> Result<u64, ProcessError> {
    for img in super::maps::images(maps, pid).iter().filter(|i| i.executable) {
        let Ok(image) = Image::open(&img.open_path) else {
            continue;
        };
        let bias = img.base.wrapping_sub(image.link_base());
        for seg in image.segments().iter().filter(|s| s.executable) {
            let file_end = bias.wrapping_add(seg.vaddr + seg.filesz);
            let page_end = file_end.next_multiple_of(PAGE);
            // Leave a little distance after the last code byte.
            let first = (file_end + 16).next_multiple_of(16);
            if first + need as u64 > page_end {
                continue;
            }
            let in_exec_mapping = maps
                .iter()
                .any(|m| m.executable && m.inode != 0 && m.start <= first && page_end <= m.end);
            if !in_exec_mapping {
                continue;
            }
            let (lo, hi) = (first.wrapping_sub(bias), page_end.wrapping_sub(bias));
            let covered = image
                .functions()
                .iter()
                .any(|f| f.address < hi && f.address + f.size.max(1) > lo);
            if covered {
                continue;
            }
            let Ok(bytes) = mem.read(first, (page_end - first) as usize) else {
                continue;
            };
            // The first all-zero window, 16-aligned, with 16 zero bytes
            // before it (a cave left behind by a killed tool is skipped).
            let mut at = 0usize;
            while at + need <= bytes.len() {
                let guard = at.saturating_sub(16);
                match bytes[guard..at + need].iter().rposition(|&b| b != 0) {
                    None => return Ok(first + at as u64),
                    Some(nz) => at = (guard + nz + 1 + 16).next_multiple_of(16),
                }
            }
        }
    }
    Err(ProcessError::Unsupported {
        pid,
        what: format!("no code cave of {need} zero bytes in any executable mapping"),
    })
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

/// One remote call in a session of its own: takes an idle call region (or
/// maps one), calls, and leaves the target's mappings as they were (a
/// region it mapped is unmapped again); returns `rax`. For many calls, keep
/// a [`Remote`].
pub fn call(pid: i32, function: u64, args: &[u64]) -> Result<u64, ProcessError> {
    let mut remote = Remote::attach(pid, Placement::Anywhere)?;
    let value = remote.call(function, args)?;
    if !remote.reused()
        && let Err(e) = remote.release()
    {
        tracing::warn!(pid, error = %e, "could not unmap the remote-call region");
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(start: u64, end: u64, path: Option<&str>) -> MapEntry {
        MapEntry {
            start,
            end,
            readable: true,
            writable: true,
            executable: false,
            private: true,
            offset: 0,
            inode: 0,
            path: path.map(String::from),
            deleted: false,
        }
    }

    #[test]
    fn spots_near_stay_in_reach() {
        let maps = [
            m(0x5555_5555_4000, 0x5555_5555_9000, Some("/bin/x")),
            m(0x5555_5555_9000, 0x5555_5557_a000, Some("[heap]")),
            m(0x7fff_f7d0_0000, 0x7fff_f7f0_0000, Some("/lib/libc.so.6")),
            m(0x7fff_fffd_e000, 0x7fff_ffff_f000, Some("[stack]")),
        ];
        let size = 0x12_0000;
        let spots = free_spots(&maps, size, Placement::Near(0x5555_5555_6000));
        assert!(!spots.is_empty());
        // The best spot is right below the image.
        assert_eq!(spots[0], 0x5555_5555_4000 - PAGE - size);
        for s in &spots {
            assert!(s.abs_diff(0x5555_5555_6000) <= REACH);
            assert!((s + size).abs_diff(0x5555_5555_6000) <= REACH);
            assert_eq!(s % PAGE, 0);
            // Not in brk's way.
            assert!(!(0x5555_5557_a000..0x5555_5557_a000 + (256 << 20)).contains(s));
            for e in &maps {
                assert!(s + size <= e.start || *s >= e.end, "{s:#x} overlaps {e:?}");
            }
        }
        let any = free_spots(&maps, size, Placement::Anywhere);
        // Highest first, and not in the stack's growth room.
        assert!(any[0] + size <= 0x7fff_fffd_e000 - (16 << 20));
        assert!(any[0] > 0x7fff_f7f0_0000);
    }

    #[test]
    fn spots_respect_reach_when_far() {
        // The only gaps near the address are too small: nothing within reach.
        let maps = [
            m(0x1_0000, 0x7000_0000_0000, None),
            m(0x7000_0000_1000, 0x7fff_0000_0000, None),
        ];
        assert!(free_spots(&maps, 0x10_0000, Placement::Near(0x3000_0000_0000)).is_empty());
        let spots = free_spots(&maps, 0x10_0000, Placement::Near(0x7fff_0000_0000));
        assert!(!spots.is_empty());
        assert!(spots[0] >= 0x7fff_0000_1000);
    }

    #[test]
    fn xsave_size_is_sane() {
        let s = xsave_size();
        assert!((576..=1 << 16).contains(&s), "{s}");
    }
}
