//! `hotpatch apply PID PATCH.so`.

use super::EngineError;
use super::target::{self, Lock, StateRegion};
use crate::image::find_symbol;
use crate::patchfile::{CommandLineRecords, PatchSpec, RefKind};
use crate::plan::{self, FunctionFlip, Scratch, Write};
use crate::process::{AllStopped, Mem, Placement, Process, ProcessError, Remote};
use crate::state::{FunctionRecord, PatchRecord, State, Version};
use std::time::{Duration, Instant};

const RTLD_NOW: i32 = 2;

#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Apply even if the patch was made for another build of the image.
    pub force: bool,
    /// Records for a patch without a `.hotpatch` section.
    pub records: CommandLineRecords,
}

/// How a function went live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum FlipMode {
    /// Byte by byte with every thread running.
    Live,
    /// With every thread stopped for the write, this long.
    Stopped { stopped_us: u64 },
    /// Already patched: its slot now points at the new version.
    Superseded,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AppliedFunction {
    pub name: String,
    pub entry: u64,
    pub replacement: u64,
    #[serde(flatten)]
    pub mode: FlipMode,
}

/// What `apply` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Applied {
    pub pid: i32,
    pub patch: PatchRecord,
    pub functions: Vec<AppliedFunction>,
    /// Wall time of the whole apply, in microseconds.
    pub elapsed_us: u64,
}

/// A planned function: everything but the process-dependent addresses.
struct Planned {
    name: String,
    entry: u64,
    flip: crate::arch::x86_64::FlipPlan,
    replacement_symbol: String,
}

/// Compare-and-swap writes done so far, undone in reverse on failure.
struct UndoLog<'a> {
    mem: &'a Mem,
    done: Vec<Write>,
}

impl<'a> UndoLog<'a> {
    fn write(&mut self, w: &Write) -> Result<(), EngineError> {
        self.mem.write_expecting(w.address, &w.expected, &w.new)?;
        self.done.push(w.clone());
        Ok(())
    }

    fn undo(&mut self) {
        while let Some(w) = self.done.pop() {
            let inv = w.inverse();
            if let Err(e) = self.mem.write_expecting(inv.address, &inv.expected, &inv.new) {
                tracing::error!("rollback of {:#x} failed: {e}", w.address);
            }
        }
    }
}

/// Apply the patch at `path` to process `pid`.
pub fn apply(pid: i32, path: &std::path::Path, options: &ApplyOptions) -> Result<Applied, EngineError> {
    let started = Instant::now();
    // 1. Everything that needs no change to the process.
    let spec = PatchSpec::read(path, &options.records)?;
    tracing::trace!(us = started.elapsed().as_micros() as u64, "apply: spec read");
    let process = Process::open(pid)?;
    let target = target::target_image(&process, spec.target.as_ref())?;
    tracing::trace!(us = started.elapsed().as_micros() as u64, "apply: target read");
    let image_name = target.mapped.path.clone();
    if let Some(wanted) = spec.target.as_ref().and_then(|t| t.build_id.clone()) {
        let found = target.image.build_id_hex();
        if found.as_deref() != Some(wanted.as_str()) && !options.force {
            return Err(EngineError::BuildIdMismatch {
                patch: path.display().to_string(),
                pid,
                image: image_name,
                wanted,
                found: found.unwrap_or_else(|| "none".into()),
            });
        }
    }
    let mut planned: Vec<Planned> = Vec::new();
    for r in &spec.replacements {
        let (entry, flip) = plan::prepared_function(&target.image, &r.target)?;
        if let Some(other) = planned.iter().find(|p| p.entry == entry) {
            return Err(EngineError::Failed {
                pid,
                what: format!("`{}` and `{}` are the same function", other.name, r.target),
            });
        }
        planned.push(Planned {
            name: r.target.clone(),
            entry,
            flip,
            replacement_symbol: r.replacement.clone(),
        });
    }
    tracing::trace!(
        us = started.elapsed().as_micros() as u64,
        "apply: functions planned"
    );
    let mut pointers: Vec<(String, u64)> = Vec::new();
    for r in &spec.references {
        let value = match r.kind {
            RefKind::Symbol => find_symbol(&target.image, &r.symbol)?.address,
            // The original body: just past the entry nops, which do nothing.
            // (A function the patch replaces is planned already: surveying
            // one decodes the whole image.)
            RefKind::Original => match planned.iter().find(|p| p.name == r.symbol) {
                Some(p) => p.flip.short_jump_at + 2,
                None => plan::prepared_function(&target.image, &r.symbol)?.1.short_jump_at + 2,
            },
        };
        pointers.push((r.pointer.clone(), target.bias.wrapping_add(value)));
    }
    let dl_path = target::patch_path(path).map_err(|e| crate::image::ImageError::Io {
        path: path.to_path_buf(),
        error: e,
    })?;

    // 2. Into the process.
    tracing::debug!(pid, us = started.elapsed().as_micros() as u64, "apply: planned");
    let _lock = Lock::take(pid)?;
    let maps = process.maps()?;
    let (mut region, mut state) = match StateRegion::find(pid, &maps)? {
        Some((r, s)) => (Some(r), s),
        None => (None, State::default()),
    };
    tracing::debug!(
        pid,
        us = started.elapsed().as_micros() as u64,
        "apply: state read"
    );
    let mut remote = Remote::attach(pid, Placement::Anywhere)?;
    tracing::debug!(pid, us = started.elapsed().as_micros() as u64, "apply: attached");
    let result = apply_in(
        &mut remote,
        &mut region,
        &mut state,
        ApplyInput {
            pid,
            spec: &spec,
            image_name: &image_name,
            bias: target.bias,
            planned: &planned,
            pointers: &pointers,
            dl_path: &dl_path.display().to_string(),
            build_id: target.image.build_id_hex(),
        },
    );
    tracing::debug!(
        pid,
        us = started.elapsed().as_micros() as u64,
        "apply: done in process"
    );
    // The call region stays mapped for the next run of the tool.
    drop(remote);
    let (patch, functions) = result?;
    Ok(Applied {
        pid,
        patch,
        functions,
        elapsed_us: started.elapsed().as_micros() as u64,
    })
}

struct ApplyInput<'a> {
    pid: i32,
    spec: &'a PatchSpec,
    image_name: &'a str,
    bias: u64,
    planned: &'a [Planned],
    pointers: &'a [(String, u64)],
    dl_path: &'a str,
    build_id: Option<String>,
}

fn apply_in(
    remote: &mut Remote,
    region: &mut Option<StateRegion>,
    state: &mut State,
    input: ApplyInput<'_>,
) -> Result<(PatchRecord, Vec<AppliedFunction>), EngineError> {
    let pid = input.pid;
    let handle = remote.dlopen(input.dl_path, RTLD_NOW)?;
    let mem = Mem::open(pid)?;
    let mut log = UndoLog {
        mem: &mem,
        done: Vec::new(),
    };
    let result = load_and_prepare(remote, region, state, &input, handle, &mut log);
    let Staged { flips, supersede } = match result {
        Ok(v) => v,
        Err(e) => {
            log.undo();
            if let Ok(dlclose) = remote.libc_function("dlclose") {
                let _ = remote.call(dlclose, &[handle]);
            }
            return Err(e);
        }
    };

    // Record the patch as incomplete before any entry flips, so a tool
    // killed from here on leaves a record `revert` can act on.
    let id = state.next_patch_id.max(1);
    state.next_patch_id = id + 1;
    let mut record = PatchRecord {
        id,
        path: input.dl_path.to_string(),
        build_id: input.spec.build_id.clone(),
        image: input.image_name.to_string(),
        image_build_id: input.build_id.clone(),
        applied_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        functions: flips
            .iter()
            .map(|f| f.0)
            .chain(supersede.iter().map(|s| s.entry))
            .collect(),
        handle,
        complete: false,
    };
    let before = state.clone();
    for (planned_entry, flip) in &flips {
        let mut undo: Vec<Write> = flip.entry_bytes.iter().rev().map(Write::inverse).collect();
        undo.extend(flip.prepare.iter().skip(1).rev().map(Write::inverse));
        state.functions.push(FunctionRecord {
            image: input.image_name.to_string(),
            name: flip.name.clone(),
            entry: *planned_entry,
            slot: flip.slot,
            undo,
            live_safe: flip.live_safe,
            versions: vec![Version {
                patch: id,
                replacement: flip.replacement,
            }],
            original: flip.original,
        });
    }
    for s in &supersede {
        if let Some(f) = state.functions.iter_mut().find(|f| f.entry == s.entry) {
            f.versions.push(Version {
                patch: id,
                replacement: s.replacement,
            });
        }
    }
    state.patches.push(record.clone());
    let region = region.as_mut().ok_or_else(|| EngineError::Failed {
        pid,
        what: "no state region".into(),
    })?;
    if let Err(e) = region.write(&mem, state) {
        log.undo();
        *state = before;
        return Err(e);
    }

    // 3. The flips.
    let mut applied = Vec::new();
    let mut flipped: Vec<&FunctionFlip> = Vec::new();
    let mut superseded: Vec<(u64, u64)> = Vec::new();
    let outcome: Result<(), EngineError> = (|| {
        for (entry, flip) in &flips {
            let mode = flip_entry(pid, &mem, flip)?;
            flipped.push(flip);
            applied.push(AppliedFunction {
                name: flip.name.clone(),
                entry: *entry,
                replacement: flip.replacement,
                mode,
            });
        }
        for s in &supersede {
            let old = mem.read_u64(s.slot)?;
            target::store_slot(state, remote, s.slot, s.replacement)?;
            superseded.push((s.slot, old));
            let name = state
                .function(s.entry)
                .map(|f| f.name.clone())
                .unwrap_or_default();
            applied.push(AppliedFunction {
                name,
                entry: s.entry,
                replacement: s.replacement,
                mode: FlipMode::Superseded,
            });
        }
        Ok(())
    })();
    if let Err(e) = outcome {
        // Undo the flips done, then everything prepared.
        for (slot, old) in superseded.iter().rev() {
            let _ = target::store_slot(state, remote, *slot, *old);
        }
        for flip in flipped.iter().rev() {
            let undo: Vec<Write> = flip.entry_bytes.iter().rev().map(Write::inverse).collect();
            if let Err(u) = write_entry(pid, &mem, &undo, flip.entry, flip.live_safe) {
                tracing::error!("rollback of {} failed: {u}", flip.name);
            }
        }
        log.undo();
        target::sync_cores(remote);
        *state = before;
        let _ = region.write(&mem, state);
        return Err(e);
    }
    target::sync_cores(remote);
    record.complete = true;
    if let Some(p) = state.patches.iter_mut().find(|p| p.id == id) {
        p.complete = true;
    }
    region.write(&mem, state)?;
    Ok((record, applied))
}

/// A function already patched: its live slot gets the new version.
struct Supersede {
    entry: u64,
    slot: u64,
    replacement: u64,
}

/// What `load_and_prepare` leaves for the flip phase.
struct Staged {
    /// New functions: (entry, flip), padding and slot already written.
    flips: Vec<(u64, FunctionFlip)>,
    supersede: Vec<Supersede>,
}

/// dlopen'd patch → pointers filled, scratch allocated, and for every new
/// function its slot, trampoline and padding written. Returns the flips to
/// do and the live slots to change (entry, slot, new value).
fn load_and_prepare(
    remote: &mut Remote,
    region: &mut Option<StateRegion>,
    state: &mut State,
    input: &ApplyInput<'_>,
    handle: u64,
    log: &mut UndoLog<'_>,
) -> Result<Staged, EngineError> {
    let pid = input.pid;
    // Every name at once: mostly read from the patch file, not one remote
    // call each.
    let names: Vec<&str> = input
        .pointers
        .iter()
        .map(|(pointer, _)| pointer.as_str())
        .chain(input.planned.iter().map(|p| p.replacement_symbol.as_str()))
        .collect();
    let addresses = remote.dlsym_many(handle, &names)?;
    let (pointer_at, replacements) = addresses.split_at(input.pointers.len());
    for ((_, value), &at) in input.pointers.iter().zip(pointer_at) {
        let current = log.mem.read(at, 8)?;
        log.write(&Write {
            address: at,
            expected: current,
            new: value.to_le_bytes().to_vec(),
        })?;
    }
    if region.is_none() {
        *region = Some(StateRegion::create(remote)?);
    }
    let mut flips = Vec::new();
    let mut supersede = Vec::new();
    for (p, &replacement) in input.planned.iter().zip(replacements) {
        let entry = input.bias.wrapping_add(p.entry);
        if let Some(existing) = state.function(entry) {
            supersede.push(Supersede {
                entry,
                slot: existing.slot,
                replacement,
            });
            continue;
        }
        let slot = target::scratch(state, remote, entry, false, 8)?;
        let trampoline = match p.flip.long_jump {
            crate::arch::x86_64::LongJump::Trampoline => {
                Some(target::scratch(state, remote, entry, true, 8)?)
            }
            crate::arch::x86_64::LongJump::Slot => None,
        };
        let flip = plan::flip_writes(
            &p.name,
            input.image_name,
            input.bias,
            &p.flip,
            replacement,
            Scratch { slot, trampoline },
        )?;
        for w in &flip.prepare {
            log.write(w)?;
        }
        flips.push((entry, flip));
    }
    // The stub that changes live slots, mapped now so that a later failure
    // cannot come from mapping it.
    if !supersede.is_empty() {
        let near = supersede[0].slot;
        target::store64(state, remote, near)?;
    }
    let _ = pid;
    Ok(Staged { flips, supersede })
}

/// Flip one entry: byte by byte with threads running where proven safe,
/// else with every thread stopped.
fn flip_entry(pid: i32, mem: &Mem, flip: &FunctionFlip) -> Result<FlipMode, EngineError> {
    write_entry(pid, mem, &flip.entry_bytes, flip.entry, flip.live_safe)
}

/// How many times to let a thread move on when it sits inside the bytes.
const STOP_RETRIES: usize = 50;
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) fn write_entry(
    pid: i32,
    mem: &Mem,
    writes: &[Write],
    at: u64,
    live_safe: bool,
) -> Result<FlipMode, EngineError> {
    if live_safe {
        for w in writes {
            mem.write_expecting(w.address, &w.expected, &w.new)?;
        }
        return Ok(FlipMode::Live);
    }
    let inside = |rip: u64| rip > at && rip < at + 2;
    for _ in 0..STOP_RETRIES {
        let stopped = AllStopped::stop(pid, STOP_TIMEOUT)?;
        if stopped.rips()?.iter().any(|&(_, rip)| inside(rip)) {
            drop(stopped);
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        for w in writes {
            mem.write_expecting(w.address, &w.expected, &w.new)?;
        }
        let took = stopped.took;
        drop(stopped);
        return Ok(FlipMode::Stopped {
            stopped_us: took.as_micros() as u64,
        });
    }
    Err(ProcessError::Timeout {
        pid,
        tid: pid,
        what: format!("a thread stays between the entry bytes at {at:#x}"),
        after: STOP_TIMEOUT,
    }
    .into())
}
