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
//! # Programs
//!
//! A call runs one function; a *program* ([`crate::process::program`],
//! driven through [`Running`]) runs a whole sequence of system calls and
//! calls in one call, stopping at rendezvous points where the tool does
//! its part: an apply is one trip (see `running.rs`).
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

mod bootstrap;
mod hijack;
mod load;
mod region;
mod running;
mod target_libc;

use bootstrap::*;
use hijack::*;
use region::*;
use target_libc::*;

pub use bootstrap::find_cave;
pub use load::{ContentLoad, LoadedLibrary, unique_fd_path};
pub use region::{CallFrames, REGION_NAME, free_spots, regions, remove_regions, xsave_size};
pub use running::{BUDGET, ProgramData, Running};
pub use target_libc::TargetLibc;

use super::preflight::{self, Depth, Operation, Scope};
use super::priority;
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
const NR_PRCTL: u64 = 157;
/// The end of the info area holds the region's name (see `name_region`).
const NAME_ROOM: u64 = 32;
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
    /// A region this session made, not named yet (see `name_region`).
    unnamed: bool,
    /// The thread of the last program, maybe still leaving the stub: the
    /// frame, code page and data block are its until the done flag.
    pending: Option<i32>,
    /// The threads a preflight judged ([`Remote::judged`]): others are
    /// checked before they run a call.
    scope: Scope,
    op: Operation,
}

/// The fixed parts of a session being opened.
#[derive(Clone, Copy)]
struct Session {
    pid: i32,
    timeouts: Timeouts,
    /// Which threads the session may use (its scope and operation).
    choice: Choice,
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
                // Only the functions the record holds: any other is read
                // from the whole file if a session ever asks for it.
                let found = TargetLibc::find_names(pid, &maps, &LibcInfo::names()).ok();
                let info = LibcInfo::of(found.as_ref());
                if let Err(e) = info.write(&mem, &layout) {
                    tracing::debug!(pid, error = %e, "could not record libc in the call region");
                }
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
            unnamed: false,
            pending: None,
            scope: self.choice.scope,
            op: self.choice.op,
        }
    }
}

impl Remote {
    /// Open a session: reuse a call region left in the target by an earlier
    /// session if there is an idle one placed as asked, else map one
    /// (through a cave, see the module docs) and put the session stub in it.
    /// Any thread may be used once checked ([`Scope::PlainThreads`]).
    pub fn attach(pid: i32, placement: Placement) -> Result<Remote, ProcessError> {
        Self::attach_with(pid, placement, Timeouts::default())
    }

    pub fn attach_with(pid: i32, placement: Placement, timeouts: Timeouts) -> Result<Remote, ProcessError> {
        Self::open(pid, placement, timeouts, Choice::default(), true)?
            .ok_or(ProcessError::NoSuchProcess { pid })
    }

    /// [`Remote::attach`] after a preflight for `op` judged `scope` (its
    /// [`preflight::Report::scope`]): at [`Scope::EveryThread`] any thread
    /// may run a call; at [`Scope::PlainThreads`] each thread is checked
    /// first, and every thread judged again before one that is not plain
    /// is used. `maps` are the process's, read since the caller took the
    /// process's lock (no session changed them since; each read costs
    /// 0.5 ms at 1,000 mappings).
    pub fn attach_judged(
        pid: i32,
        placement: Placement,
        scope: Scope,
        op: Operation,
        maps: Vec<MapEntry>,
    ) -> Result<Remote, ProcessError> {
        let choice = Choice {
            scope,
            op,
            ..Choice::default()
        };
        Self::open_with(pid, placement, Timeouts::default(), choice, true, Some(maps))?
            .ok_or(ProcessError::NoSuchProcess { pid })
    }

    /// Like [`Remote::attach_with`]; with `create` false, only an existing
    /// idle region is taken (`None` if there is none).
    fn open(
        pid: i32,
        placement: Placement,
        timeouts: Timeouts,
        choice: Choice,
        create: bool,
    ) -> Result<Option<Remote>, ProcessError> {
        Self::open_with(pid, placement, timeouts, choice, create, None)
    }

    /// [`Remote::open`] with the maps the caller read, if any.
    fn open_with(
        pid: i32,
        placement: Placement,
        timeouts: Timeouts,
        choice: Choice,
        create: bool,
        maps: Option<Vec<MapEntry>>,
    ) -> Result<Option<Remote>, ProcessError> {
        let t0 = Instant::now();
        if pid <= 0 {
            return Err(ProcessError::NoSuchProcess { pid });
        }
        let maps = match maps {
            Some(m) => m,
            None => super::Process { pid }.maps()?,
        };
        check_supported(pid)?;
        let mem = Mem::open(pid)?;
        let xsave = xsave_size();
        let size = Layout::size_for(xsave);
        let started = super::lock::start_time(pid)?;
        let session = Session {
            pid,
            timeouts,
            choice,
        };
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
            match bootstrap(&mem, &layout, timeouts, choice) {
                Ok(()) => {
                    let stub = match install_stub(&mem, &layout) {
                        Ok(stub) => stub,
                        Err(e) => return Err(unmap_failed(&mem, &layout, timeouts, choice, e)),
                    };
                    let mut r = session.into_remote(mem, layout, stub, lock, false, maps);
                    // Named by the first trip (a program's first step, or
                    // before the first plain call): no trip of its own.
                    r.unnamed = true;
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
        let r = self.write_region_name().and_then(|at| {
            let args = self.name_args(at);
            self.syscall(NR_PRCTL, &args)
        });
        match r {
            Ok(0) => {}
            other => tracing::debug!(pid = self.pid, ?other, "could not name the call region"),
        }
    }

    /// Write [`REGION_NAME`] where nothing else goes (the end of the info
    /// area: the scratch area may hold a call's arguments); its address.
    fn write_region_name(&self) -> Result<u64, ProcessError> {
        let mut name = REGION_NAME.as_bytes().to_vec();
        name.push(0);
        let at = self.layout.info() + stub::INFO_SIZE - NAME_ROOM;
        self.mem.write(at, &name)?;
        Ok(at)
    }

    /// `prctl` arguments that name the region, the name at `at`.
    fn name_args(&self, at: u64) -> [u64; 5] {
        const PR_SET_VMA: u64 = 0x5356_4d41;
        const PR_SET_VMA_ANON_NAME: u64 = 0;
        [
            PR_SET_VMA,
            PR_SET_VMA_ANON_NAME,
            self.layout.base,
            self.layout.size(),
            at,
        ]
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

    /// The threads this session may use, for a call through a cave.
    fn cave_choice(&self) -> Choice {
        Choice {
            scope: self.scope,
            op: self.op,
            ..Choice::default()
        }
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
    pub fn release(mut self) -> Result<(), ProcessError> {
        self.settle_or_fail()?;
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
        unmap_through_cave(&self.mem, self.region(), self.timeouts, self.cave_choice())
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
    pub(crate) fn dlerror(&mut self, tid: i32) -> String {
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
        let t0 = Instant::now();
        let tid = self.launch(function, args, nr, None)?;
        let start = Instant::now();
        self.wait_done(
            tid,
            &format!("waiting for the remote call of {function:#x} to return"),
        )?;
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

    /// Send a thread into the stub to call `function(args)`; returns its
    /// tid. The call then runs on its own: [`Remote::wait_done`] waits.
    fn launch(
        &mut self,
        function: u64,
        args: &[u64],
        nr: u64,
        lend_priority: Option<u64>,
    ) -> Result<i32, ProcessError> {
        self.settle_or_fail()?;
        if self.unnamed {
            self.unnamed = false;
            self.name_region();
        }
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
        let frame_at = self.layout.frame();
        let (entry, errno_fn) = (self.stub.entry, self.errno_fn);
        let mut committed = false;
        let mut choice = Choice {
            pinned: self.pinned,
            seed: spread_seed(self.calls),
            scope: self.scope,
            op: self.op,
            lend: lend_priority.is_some(),
        };
        let hijacked = hijack(
            self.pid,
            &self.mem,
            self.timeouts,
            &mut choice,
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
                    lend_priority,
                })
            },
        );
        self.scope = choice.scope;
        let tid = match hijacked {
            // A loan the program did not take is given back now.
            Ok((tid, _loan)) => tid,
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
        Ok(tid)
    }

    /// Wait for the call given to thread `tid` to be done with the frame;
    /// `what` names the wait in a timeout error.
    fn wait_done(&mut self, tid: i32, what: &str) -> Result<(), ProcessError> {
        let done_at = self.layout.frame() + frame::DONE;
        let start = Instant::now();
        let mut backoff = Backoff::new(super::ptrace::WAIT_NAP_MAX);
        loop {
            match self.mem.read_u32(done_at) {
                Ok(1) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(self.gone_or(tid, e, "during the remote call")),
            }
            if start.elapsed() >= self.timeouts.call {
                if !threads::thread_exists(self.pid, tid) {
                    return Err(self.gone_or(tid, ProcessError::NoSuchThread { pid: self.pid, tid }, ""));
                }
                self.poisoned = Some(format!("thread {tid} may still be running a call ({what})"));
                return Err(ProcessError::Timeout {
                    pid: self.pid,
                    tid,
                    what: what.to_string(),
                    after: self.timeouts.call,
                });
            }
            backoff.pause();
        }
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
