//! The trips an apply or a revert makes into the target: **one** program
//! (see [`crate::process::program`]) that does everything the target must
//! do itself — map the state region and scratch, create the patch's memfd,
//! `dlopen` it, store live slots, serialise the cores — with the tool's
//! own work at its rendezvous points. Whatever the program did not get to
//! (it gave up waiting, a table did not fit, a step failed), the tool
//! finishes with plain remote calls, as before programs existed: the
//! program is an optimisation that never changes what ends up done.

use super::EngineError;
use super::target::{self, StateRegion};
use crate::process::program::{Arg, Check, Step};
use crate::process::remote::ContentLoad;
use crate::process::{MapEntry, Remote, Running};
use crate::state::{self, ScratchRecord, State};

const PROT_READ: u64 = 1;
const PROT_WRITE: u64 = 2;
const PROT_EXEC: u64 = 4;
const MAP_PRIVATE: u64 = 0x02;
const MAP_ANONYMOUS: u64 = 0x20;
const MAP_FIXED_NOREPLACE: u64 = 0x10_0000;
const MFD_CLOEXEC: u64 = 1;
const NR_CLOSE: u64 = 3;
const NR_MMAP: u64 = 9;
const NR_FTRUNCATE: u64 = 77;
const NR_MEMFD_CREATE: u64 = 319;
const RTLD_NOW: u64 = 2;

/// The slot stores a program makes after its `loaded` rendezvous.
#[derive(Debug, Clone, Copy)]
struct Stores {
    table: u64,
    count: usize,
    step: Step,
}

/// A program still running, and what it has left to do.
#[derive(Debug)]
pub(super) struct Live<'r> {
    run: Running<'r>,
    /// It waits here for the live slots' table (or only for the go, when
    /// there are none).
    loaded: u32,
    stores: Option<Stores>,
    /// After the stores it waits here while the tool writes the entries.
    entries: Option<u32>,
    sync: Step,
    /// Its sync comes after every code write of the apply.
    sync_counts: bool,
    /// `go(loaded)` was given.
    past_loaded: bool,
}

/// Through the running program while it can, by plain remote calls after.
#[derive(Debug)]
pub(super) struct Trip<'r> {
    stage: Stage<'r>,
}

#[derive(Debug)]
enum Stage<'r> {
    Program(Box<Live<'r>>),
    Plain {
        remote: &'r mut Remote,
        /// The program serialised the cores after the last code write.
        synced: bool,
    },
    /// Only while changing from one to the other.
    Ended,
}

fn failed(pid: i32, what: &str, detail: String) -> EngineError {
    EngineError::Process(crate::process::ProcessError::CallFailed {
        pid,
        what: what.into(),
        detail,
    })
}

/// What a step's result says: the error of a `-errno`, else the value.
fn result_text(v: u64) -> String {
    let r = v as i64;
    if (-4095..0).contains(&r) {
        std::io::Error::from_raw_os_error(-r as i32).to_string()
    } else {
        format!("returned {v:#x}")
    }
}

/// What an apply asks of its program.
pub(super) struct ApplyTrip<'a> {
    pub bytes: &'a [u8],
    pub label: &'a str,
    /// Make the state region (the process has none).
    pub make_region: bool,
    /// Scratch page sets to map (see [`target::plan_scratch`]).
    pub new_scratch: &'a [ScratchRecord],
    /// Live slots the apply will store (functions patched before).
    pub live_slots: usize,
    /// Where their table goes if it does not fit the program's data block
    /// (see [`big_table`]).
    pub big_table: Option<u64>,
    /// Whether entries will be written (functions not live now).
    pub entries: bool,
    /// Whether that needs every thread stopped: the program then ends
    /// before the entries are written (a thread running it would hide its
    /// own context from the stop), and the cores are synced after by a
    /// trip of their own.
    pub entries_stopped: bool,
    /// A data page of ours whose protection may change, for a TLB
    /// shootdown where `membarrier` is refused; 0 if none.
    pub shootdown_page: u64,
}

/// The result of the program's first part: the patch is loaded.
pub(super) struct Loaded<'r> {
    pub trip: Trip<'r>,
    pub handle: u64,
    pub region: Option<StateRegion>,
    /// Scratch page sets now mapped (to record).
    pub scratch: Vec<ScratchRecord>,
}

/// Start the apply's program and run it up to the patch being loaded
/// (checked to be these bytes). On failure, everything the program made
/// that nothing records is undone, by plain calls (the state region and
/// scratch stay: harmless, and recorded/reused).
pub(super) fn load<'r>(
    remote: &'r mut Remote,
    ask: ApplyTrip<'_>,
) -> Result<Loaded<'r>, Box<(EngineError, LeftOver)>> {
    let pid = remote.pid();
    let dlopen = remote
        .libc_function("dlopen")
        .map_err(|e| Box::new((e.into(), LeftOver::default())))?;
    let load =
        ContentLoad::new(pid, ask.bytes, ask.label).map_err(|e| Box::new((e.into(), LeftOver::default())))?;
    let (mut p, mut d) = remote.program();
    let mem = remote.mem();
    let mut put = |bytes: &[u8]| -> Result<u64, EngineError> {
        let at = d
            .take(bytes.len() as u64)
            .ok_or_else(|| failed(pid, "the program", "its strings do not fit".into()))?;
        mem.write(at, bytes)?;
        Ok(at)
    };
    let fail = |e| Box::new((e, LeftOver::default()));
    // The state region: a sparse memfd mapped private, read-only.
    let region_steps = if ask.make_region {
        let mut name = state::MEMFD_NAME.as_bytes().to_vec();
        name.push(0);
        let name_at = put(&name).map_err(fail)?;
        let size = state::REGION_SIZE as u64;
        let fd = p.syscall(
            NR_MEMFD_CREATE,
            &[Arg::Imm(name_at), Arg::Imm(MFD_CLOEXEC)],
            Check::NonNegative,
        );
        let sized = p.syscall(
            NR_FTRUNCATE,
            &[Arg::Result(fd), Arg::Imm(size)],
            Check::NonNegative,
        );
        let map = p.syscall(
            NR_MMAP,
            &[
                Arg::Imm(0),
                Arg::Imm(size),
                Arg::Imm(PROT_READ),
                Arg::Imm(MAP_PRIVATE),
                Arg::Result(fd),
                Arg::Imm(0),
            ],
            Check::NonNegative,
        );
        let close = p.syscall(NR_CLOSE, &[Arg::Result(fd)], Check::None);
        Some((fd, sized, map, close))
    } else {
        None
    };
    let mut named: Vec<(Step, String)> = Vec::new();
    if let Some((fd, sized, map, _)) = region_steps {
        named.push((fd, "memfd_create of the state region".into()));
        named.push((sized, "ftruncate of the state region".into()));
        named.push((map, "mmap of the state region".into()));
    }
    let scratch_steps: Vec<Step> = ask
        .new_scratch
        .iter()
        .map(|r| {
            // Code sets are mapped read+execute at once: the tool writes
            // them through /proc/PID/mem, as it writes trampolines.
            let prot = if r.executable {
                PROT_READ | PROT_EXEC
            } else {
                PROT_READ | PROT_WRITE
            };
            p.syscall(
                NR_MMAP,
                &[
                    Arg::Imm(r.base),
                    Arg::Imm(r.size),
                    Arg::Imm(prot),
                    Arg::Imm(MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE),
                    Arg::Imm(u64::MAX),
                    Arg::Imm(0),
                ],
                Check::Equals(r.base),
            )
        })
        .collect();
    for (s, r) in scratch_steps.iter().zip(ask.new_scratch) {
        named.push((
            *s,
            format!("mmap of {:#x} bytes of scratch at {:#x}", r.size, r.base),
        ));
    }
    let memfd_name = put(&load.memfd_name()).map_err(fail)?;
    let prefix = load.path_prefix();
    let mut path = prefix.as_bytes().to_vec();
    path.extend_from_slice(&[0; 24]);
    let path_at = put(&path).map_err(fail)?;
    let memfd = p.syscall(
        NR_MEMFD_CREATE,
        &[Arg::Imm(memfd_name), Arg::Imm(load.memfd_flags())],
        Check::NonNegative,
    );
    // A tool gone while the thread waits here leaves no descriptor behind.
    named.push((memfd, "memfd_create for the patch".into()));
    let filled = p.wait_closing(memfd);
    p.digits(memfd, path_at + prefix.len() as u64);
    let opened = p.call(dlopen, &[Arg::Imm(path_at), Arg::Imm(RTLD_NOW)], Check::NonZero);
    // (A handle means this close runs too: nothing between can fail.)
    p.syscall(NR_CLOSE, &[Arg::Result(memfd)], Check::None);
    let loaded = p.wait();
    let stores = if ask.live_slots > 0 {
        d.take(16 * ask.live_slots as u64)
            .or(ask.big_table)
            .map(|table| Stores {
                table,
                count: ask.live_slots,
                step: p.stores(table, ask.live_slots as u64),
            })
    } else {
        None
    };
    let entries = (ask.entries && !ask.entries_stopped).then(|| p.wait());
    // Its sync serialises the entries' writes only if they come before.
    let sync_counts = !(ask.entries && ask.entries_stopped);
    let sync = p.sync_cores(ask.shootdown_page);

    let mut run = remote
        .start(&p)
        .map_err(|e| Box::new((e.into(), LeftOver::default())))?;
    let tid = run.tid();
    let result = |run: &Running<'_>, s: Step| run.result(s);
    // What the program made so far, for the records or for cleanup.
    let made = |run: &Running<'_>| -> Result<LeftOver, crate::process::ProcessError> {
        let mut left = LeftOver::default();
        if let Some((fd, _, map, close)) = region_steps {
            let map_r = result(run, map)?;
            if (map_r as i64) > 0 {
                left.region = Some(map_r);
            }
            let fd_r = result(run, fd)? as i64;
            // close's result stays 0 until it ran (and is 0 when it did):
            // the descriptor is left open only if a step before it failed.
            if fd_r >= 0 && run.status()?.failed.is_some_and(|f| f.0 > fd.0 && f.0 < close.0) {
                left.fds.push(fd_r as u64);
            }
        }
        for (s, r) in scratch_steps.iter().zip(ask.new_scratch) {
            if result(run, *s)? == r.base {
                left.scratch.push(r.clone());
            }
        }
        Ok(left)
    };
    let finish_failed = |run: Running<'r>, e: EngineError, extra_fd: Option<u64>| {
        let mut left = made(&run).unwrap_or_default();
        let (status, remote) = run.abort();
        // A program that gave up waiting for the fill closed the memfd
        // itself: its number may be another file's now.
        if !status.is_ok_and(|s| s.gave_up == Some(filled)) {
            left.fds.extend(extra_fd);
        }
        left.clean(remote);
        Box::new((e, left))
    };
    match run.reach(filled) {
        Ok(true) => {}
        Ok(false) => {
            let status = run.status().ok();
            let why = status
                .and_then(|s| s.failed)
                .map(|f| {
                    let r = result(&run, f).unwrap_or(0);
                    let what = named
                        .iter()
                        .find(|(s, _)| *s == f)
                        .map_or_else(|| format!("step {}", f.0), |(_, w)| w.clone());
                    format!("{what} in the target failed: {}", result_text(r))
                })
                .unwrap_or_else(|| "the program ended early".into());
            return Err(finish_failed(
                run,
                failed(pid, "preparing the patch's load", why),
                None,
            ));
        }
        Err(e) => return Err(Box::new((e.into(), LeftOver::default()))),
    }
    let fd = match result(&run, memfd) {
        Ok(fd) => fd,
        Err(e) => return Err(finish_failed(run, e.into(), None)),
    };
    if let Err(e) = load.fill(pid, fd, ask.bytes) {
        return Err(finish_failed(run, e.into(), Some(fd)));
    }
    let left = match made(&run) {
        Ok(l) => l,
        Err(e) => return Err(finish_failed(run, e.into(), Some(fd))),
    };
    // Code sets start with the store routine (see `target::scratch`).
    for r in left.scratch.iter().filter(|r| r.executable) {
        if let Err(e) = run.remote().mem().write(r.base, &target::code_header()) {
            return Err(finish_failed(run, e.into(), Some(fd)));
        }
    }
    if let Err(e) = run.go(filled) {
        return Err(finish_failed(run, e.into(), Some(fd)));
    }
    let waiting = match run.reach(loaded) {
        Ok(w) => w,
        Err(e) => return Err(Box::new((e.into(), left))),
    };
    let handle = result(&run, opened).unwrap_or(0);
    if handle == 0 {
        // dlopen failed (or never ran: the program gave up first).
        let (status, remote) = run.finish();
        let closed_by_program = status.as_ref().is_ok_and(|s| s.gave_up == Some(filled));
        let detail = match status {
            Ok(s) if s.failed == Some(opened) => remote.dlerror(tid),
            Ok(s) => format!("the program stopped before dlopen ({s:?})"),
            Err(e) => e.to_string(),
        };
        let mut left = left;
        if !closed_by_program {
            left.fds.push(fd);
        }
        left.clean(remote);
        return Err(Box::new((failed(pid, "dlopen of the patch", detail), left)));
    }
    let mut left = left;
    match run.loaded(load, handle) {
        Ok(_) => {}
        Err(e) => {
            let (_, remote) = run.abort();
            left.clean(remote);
            super::apply::dlclose(remote, handle);
            return Err(Box::new((e.into(), LeftOver::default())));
        }
    }
    let region = left.region.map(StateRegion::created);
    let scratch = std::mem::take(&mut left.scratch);
    let trip = if waiting {
        Trip {
            stage: Stage::Program(Box::new(Live {
                run,
                loaded,
                stores,
                entries,
                sync,
                sync_counts,
                past_loaded: false,
            })),
        }
    } else {
        // It gave up at `loaded`: the rest by plain calls.
        let (_, remote) = run.finish();
        left.clean(remote);
        Trip {
            stage: Stage::Plain {
                remote,
                synced: false,
            },
        }
    };
    Ok(Loaded {
        trip,
        handle,
        region,
        scratch,
    })
}

/// What a program made that its failure leaves: recorded or undone.
#[derive(Debug, Default)]
pub(super) struct LeftOver {
    /// The state region it mapped.
    pub region: Option<u64>,
    /// Scratch page sets it mapped.
    pub scratch: Vec<ScratchRecord>,
    /// Descriptors it left open in the target.
    fds: Vec<u64>,
}

impl LeftOver {
    fn clean(&mut self, remote: &mut Remote) {
        for fd in self.fds.drain(..) {
            if let Err(e) = remote.syscall(NR_CLOSE, &[fd]) {
                tracing::warn!(
                    pid = remote.pid(),
                    fd,
                    "closing a descriptor the program left: {e}"
                );
            }
        }
    }
}

impl<'r> Trip<'r> {
    /// End the program (if one still runs) and hold the session for plain
    /// calls; `synced` says whether the program serialised the cores.
    fn end_program(&mut self, abort: bool) {
        let Stage::Program(_) = &self.stage else {
            return;
        };
        let Stage::Program(live) = std::mem::replace(&mut self.stage, Stage::Ended) else {
            return;
        };
        let (status, remote) = if abort {
            live.run.abort()
        } else {
            live.run.finish()
        };
        let synced = match &status {
            Ok(s) => {
                live.sync_counts
                    && s.gave_up.is_none()
                    && remote.program_result(live.sync).is_ok_and(|r| r == 0)
            }
            Err(e) => {
                tracing::warn!(pid = remote.pid(), "ending the program: {e}");
                false
            }
        };
        self.stage = Stage::Plain { remote, synced };
    }

    /// Plain remote calls from here on: a program still running is told to
    /// stop at its next rendezvous, and waited for.
    pub fn plain(&mut self) -> Option<&mut Remote> {
        self.end_program(true);
        self.remote_if_plain()
    }

    /// The session, if no program runs (plain calls may be made).
    pub fn remote_if_plain(&mut self) -> Option<&mut Remote> {
        match &mut self.stage {
            Stage::Plain { remote, .. } => Some(remote),
            _ => None,
        }
    }

    /// The loaded library's symbols, from its file alone.
    pub fn file_addresses(&self, handle: u64, names: &[&str]) -> Option<Vec<u64>> {
        match &self.stage {
            Stage::Program(live) => live.run.remote().file_addresses(handle, names),
            Stage::Plain { remote, .. } => remote.file_addresses(handle, names),
            Stage::Ended => None,
        }
    }

    /// Change live slots, each with one aligned 8-byte store: by the
    /// program right after its `loaded` rendezvous if the table was
    /// planned, else by plain calls.
    pub fn store_slots(&mut self, state: &mut State, stores: &[(u64, u64)]) -> Result<(), EngineError> {
        if let Stage::Program(live) = &mut self.stage
            && !live.past_loaded
            && live.stores.map_or(0, |s| s.count) == stores.len()
            && target::check_slots(live.run.remote(), stores).is_ok()
        {
            if let Some(s) = live.stores {
                let pairs: Vec<u8> = stores
                    .iter()
                    .flat_map(|(slot, value)| slot.to_le_bytes().into_iter().chain(value.to_le_bytes()))
                    .collect();
                live.run.write(s.table, &pairs)?;
            }
            live.past_loaded = true;
            live.run.go(live.loaded)?;
            let stores = live.stores;
            let stored = |remote: &Remote| match stores {
                Some(s) => remote.program_result(s.step).is_ok_and(|n| n == s.count as u64),
                None => true,
            };
            match live.entries {
                // It stores, then waits for the entries to be written.
                Some(phase) => {
                    if live.run.reach(phase)? && stored(live.run.remote()) {
                        return Ok(());
                    }
                }
                // No entries: it stores, serialises the cores and ends.
                None => self.end_program(false),
            }
            if let Stage::Plain { remote, .. } = &self.stage
                && stored(remote)
            {
                return Ok(());
            }
        }
        // The program did not store them (or cannot): plain calls.
        match self.plain() {
            Some(remote) => target::store_slots(state, remote, stores),
            None => Err(failed(0, "storing live slots", "no session".into())),
        }
    }

    /// Serialise every core after the entries changed: the program's last
    /// step, else plain calls.
    pub fn sync_cores(&mut self, state: &State) {
        if let Stage::Program(live) = &mut self.stage
            && live.past_loaded
            && let Some(phase) = live.entries
            && live.run.go(phase).is_ok()
        {
            self.end_program(false);
        } else {
            self.end_program(true);
        }
        let Stage::Plain { remote, synced } = &mut self.stage else {
            return;
        };
        if !*synced {
            target::sync_cores(remote, state);
        }
        // Later code writes need a sync of their own.
        *synced = false;
    }
}

impl Drop for Trip<'_> {
    /// A program still waiting is never left so (it would wait until its
    /// deadline): stopped at its rendezvous, and waited for.
    fn drop(&mut self) {
        self.end_program(true);
    }
}

/// Room for a table of `pairs` (address, value) pairs that does not fit
/// the program's data block: the free end of one of our data scratch page
/// sets (slots are handed out from the start; `reserve` bytes of it are
/// kept for the slots this apply hands out), in a mapping `maps` shows as
/// ours (anonymous, private, read-write). The pages it touches stay
/// allocated; later slots may reuse them.
pub(super) fn big_table(state: &State, maps: &[MapEntry], pairs: usize, reserve: u64) -> Option<u64> {
    let len = 16 * pairs as u64;
    state.scratch.iter().filter(|r| !r.executable).find_map(|r| {
        let end = r.base.checked_add(r.size)?;
        let at = end.checked_sub(len)? & !15;
        let free_from = r.base.checked_add(r.used)?.checked_add(reserve)?;
        (at >= free_from && target::our_data(maps, at, end)).then_some(at)
    })
}

/// A data page of ours for a TLB shootdown (see [`target::sync_cores`]).
pub(super) fn shootdown_page(state: &State, new: &[ScratchRecord], maps: &[MapEntry]) -> u64 {
    target::shootdown_page(state, maps)
        .or_else(|| {
            new.iter()
                .find(|r| !r.executable && r.base % 4096 == 0)
                .map(|r| r.base)
        })
        .unwrap_or(0)
}

/// A revert's trip: the live slots it changes, then the core sync after
/// the entries it wrote, in one program (plain calls for what it could
/// not do).
pub(super) fn stores_and_sync(
    remote: &mut Remote,
    state: &mut State,
    stores: &[(u64, u64)],
) -> Result<(), EngineError> {
    let pid = remote.pid();
    let maps = crate::process::Process::open(pid)?.maps()?;
    let page = target::shootdown_page(state, &maps).unwrap_or(0);
    let (mut p, mut d) = remote.program();
    let table = if stores.is_empty() {
        None
    } else {
        d.take(16 * stores.len() as u64)
            .or_else(|| big_table(state, &maps, stores.len(), 0))
    };
    let in_program = (stores.is_empty() || table.is_some()) && target::check_slots(remote, stores).is_ok();
    if !in_program {
        target::store_slots(state, remote, stores)?;
        target::sync_cores(remote, state);
        return Ok(());
    }
    let stored = match table {
        Some(table) => {
            let pairs: Vec<u8> = stores
                .iter()
                .flat_map(|(slot, value)| slot.to_le_bytes().into_iter().chain(value.to_le_bytes()))
                .collect();
            remote.mem().write(table, &pairs)?;
            Some(p.stores(table, stores.len() as u64))
        }
        None => None,
    };
    let sync = p.sync_cores(page);
    let run = remote.start(&p)?;
    let (status, remote) = run.finish();
    status?;
    let all_stored = match stored {
        Some(step) => remote.program_result(step)? == stores.len() as u64,
        None => true,
    };
    if !all_stored {
        target::store_slots(state, remote, stores)?;
        target::sync_cores(remote, state);
    } else if remote.program_result(sync)? != 0 {
        target::sync_cores(remote, state);
    }
    Ok(())
}
