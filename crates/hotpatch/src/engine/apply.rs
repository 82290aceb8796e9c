//! `hotpatch apply PID PATCH.so`.

use super::EngineError;
use super::stopped::{self, Overwrite};
use super::target::{self, Lock, StateRegion};
use crate::patchfile::{CommandLineRecords, PatchSpec, RefKind};
use crate::plan::{self, FunctionFlip, Planner, Scratch, Write};
use crate::process::{Mem, Placement, Process, Remote};
use crate::state::{FunctionRecord, PatchRecord, State, Version};
use std::time::Instant;

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
    super::in_process(pid, "the apply", || apply_to(pid, path, options))
}

fn apply_to(pid: i32, path: &std::path::Path, options: &ApplyOptions) -> Result<Applied, EngineError> {
    let started = Instant::now();
    // 1. Everything that needs no change to the process.
    let spec = PatchSpec::read(path, &options.records)?;
    let process = Process::open(pid)?;
    let target = target::target_image(&process, spec.target.as_ref())?;
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
    let planner = Planner::new(&target.image);
    let mut planned: Vec<Planned> = Vec::new();
    for r in &spec.replacements {
        let (entry, flip) = planner.prepared_function(&r.target)?;
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
    let mut pointers: Vec<(String, u64)> = Vec::new();
    for r in &spec.references {
        let value = match r.kind {
            RefKind::Symbol => planner.symbol(&r.symbol)?.address,
            // The original body: just past the entry nops, which do nothing.
            RefKind::Original => planner.prepared_function(&r.symbol)?.1.short_jump_at + 2,
        };
        pointers.push((r.pointer.clone(), target.bias.wrapping_add(value)));
    }
    let dl_path = target::patch_path(path).map_err(|e| crate::image::ImageError::Io {
        path: path.to_path_buf(),
        error: e,
    })?;
    tracing::debug!(pid, us = started.elapsed().as_micros() as u64, "apply: planned");

    // 2. Into the process.
    let _lock = Lock::take(pid)?;
    let maps = process.maps()?;
    let (mut region, mut state) = match StateRegion::find(pid, &maps)? {
        Some((r, s)) => (Some(r), s),
        None => (None, State::default()),
    };
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

/// What one function of the patch needs.
enum Step {
    /// Never patched: slot, trampoline and padding to write, then the entry.
    New { entry: u64, flip: FunctionFlip },
    /// Patched before and reverted: its route (padding, slot, trampoline)
    /// is still in place; the slot gets the new code, then the entry flips.
    Revive {
        entry: u64,
        slot: u64,
        replacement: u64,
        entry_bytes: Vec<Write>,
        live_safe: bool,
    },
    /// Patched now: its live slot changes with one atomic store.
    Supersede { entry: u64, slot: u64, replacement: u64 },
}

impl Step {
    fn entry(&self) -> u64 {
        match self {
            Step::New { entry, .. } | Step::Revive { entry, .. } | Step::Supersede { entry, .. } => *entry,
        }
    }
}

fn dlclose(remote: &mut Remote, handle: u64) {
    if let Ok(f) = remote.libc_function("dlclose") {
        let _ = remote.call(f, &[handle]);
    }
}

fn apply_in(
    remote: &mut Remote,
    region: &mut Option<StateRegion>,
    state: &mut State,
    input: ApplyInput<'_>,
) -> Result<(PatchRecord, Vec<AppliedFunction>), EngineError> {
    let pid = input.pid;
    let mem = Mem::open(pid)?;
    let handle = remote.dlopen(input.dl_path, RTLD_NOW)?;
    let mut log = UndoLog {
        mem: &mem,
        done: Vec::new(),
    };
    // State as read, plus any scratch pages this run maps (those stay).
    let before = state.clone();
    let restore = |state: &mut State| {
        let scratch = std::mem::take(&mut state.scratch);
        *state = before.clone();
        state.scratch = scratch;
    };

    // Load: pointers filled, scratch allocated, every step planned. Nothing
    // in the target's code or slots is written yet.
    let steps = match stage(remote, region, state, &input, handle, &mut log) {
        Ok(steps) => steps,
        Err(e) => {
            log.undo();
            restore(state);
            dlclose(remote, handle);
            return Err(e);
        }
    };

    // Record the patch, incomplete, before the first write: a tool killed
    // from here on leaves a record that `revert` acts on.
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
        functions: steps.iter().map(Step::entry).collect(),
        handle,
        complete: false,
    };
    for step in &steps {
        match step {
            Step::New { entry, flip } => {
                let mut undo: Vec<Write> = flip.entry_bytes.iter().rev().map(Write::inverse).collect();
                undo.extend(flip.prepare.iter().skip(1).rev().map(Write::inverse));
                state.functions.push(FunctionRecord {
                    image: input.image_name.to_string(),
                    name: flip.name.clone(),
                    entry: *entry,
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
            Step::Revive {
                entry, replacement, ..
            }
            | Step::Supersede {
                entry, replacement, ..
            } => {
                if let Some(f) = state.functions.iter_mut().find(|f| f.entry == *entry) {
                    f.versions.push(Version {
                        patch: id,
                        replacement: *replacement,
                    });
                }
            }
        }
    }
    state.patches.push(record.clone());
    let Some(region) = region.as_mut() else {
        return Err(EngineError::Failed {
            pid,
            what: "no state region".into(),
        });
    };
    let recorded = region.write(&mem, state).and_then(|()| {
        // The routes of new functions: code no thread runs yet.
        for step in &steps {
            if let Step::New { flip, .. } = step {
                for w in &flip.prepare {
                    log.write(w)?;
                }
            }
        }
        Ok(())
    });
    if let Err(e) = recorded {
        // No entry flipped: undoing the routes is safe.
        log.undo();
        restore(state);
        let _ = region.write(&mem, state);
        dlclose(remote, handle);
        return Err(e);
    }

    // 3. The flips. Live slots first (revived routes get their new code
    // before their entries flip; superseded functions switch here), all in
    // one batch of atomic stores; then the entries.
    let mut applied = Vec::new();
    let mut flipped: Vec<(Vec<Write>, u64, bool)> = Vec::new();
    let mut stored: Vec<(u64, u64)> = Vec::new();
    let outcome: Result<(), EngineError> = (|| {
        let mut stores = Vec::new();
        for step in &steps {
            if let Step::Revive {
                slot, replacement, ..
            }
            | Step::Supersede {
                slot, replacement, ..
            } = step
            {
                stored.push((*slot, mem.read_u64(*slot)?));
                stores.push((*slot, *replacement));
            }
        }
        target::store_slots(state, remote, &stores)?;
        for step in &steps {
            let name_of = |entry: u64| state.function(entry).map(|f| f.name.clone()).unwrap_or_default();
            let (entry, replacement, mode, name) = match step {
                Step::New { entry, flip } => {
                    let mode = write_entry(pid, &mem, &flip.entry_bytes, flip.entry, flip.live_safe)?;
                    flipped.push((flip.entry_bytes.clone(), flip.entry, flip.live_safe));
                    (*entry, flip.replacement, mode, flip.name.clone())
                }
                Step::Revive {
                    entry,
                    replacement,
                    entry_bytes,
                    live_safe,
                    ..
                } => {
                    let at = entry_bytes.iter().map(|w| w.address).min().unwrap_or(*entry);
                    let mode = write_entry(pid, &mem, entry_bytes, at, *live_safe)?;
                    flipped.push((entry_bytes.clone(), at, *live_safe));
                    (*entry, *replacement, mode, name_of(*entry))
                }
                Step::Supersede {
                    entry, replacement, ..
                } => (*entry, *replacement, FlipMode::Superseded, name_of(*entry)),
            };
            applied.push(AppliedFunction {
                name,
                entry,
                replacement,
                mode,
            });
        }
        Ok(())
    })();
    if let Err(e) = outcome {
        // Entries back first, then live slots back. The routes stay, dormant:
        // a thread may be on its way through one, so they are never torn
        // down under it; a later apply reuses them.
        for (writes, at, live_safe) in flipped.iter().rev() {
            let undo: Vec<Write> = writes.iter().rev().map(Write::inverse).collect();
            if let Err(u) = write_entry(pid, &mem, &undo, *at, *live_safe) {
                tracing::error!("rollback of the entry at {at:#x} failed: {u}");
            }
        }
        if let Err(u) = target::store_slots(state, remote, &stored) {
            tracing::error!("rollback of {} live slots failed: {u}", stored.len());
        }
        target::sync_cores(remote, state);
        for f in &mut state.functions {
            f.versions.retain(|v| v.patch != id);
        }
        state.patches.retain(|p| p.id != id);
        let _ = region.write(&mem, state);
        // Code of the patch may be running (a route was live): it stays loaded.
        if flipped.is_empty() && stored.is_empty() {
            dlclose(remote, handle);
        }
        return Err(e);
    }
    target::sync_cores(remote, state);
    record.complete = true;
    if let Some(p) = state.patches.iter_mut().find(|p| p.id == id) {
        p.complete = true;
    }
    region.write(&mem, state)?;
    Ok((record, applied))
}

/// dlopen'd patch → pointers filled (undo logged), the state region made,
/// scratch allocated, and a [`Step`] per function. Writes nothing into the
/// target's code or slots.
fn stage(
    remote: &mut Remote,
    region: &mut Option<StateRegion>,
    state: &mut State,
    input: &ApplyInput<'_>,
    handle: u64,
    log: &mut UndoLog<'_>,
) -> Result<Vec<Step>, EngineError> {
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
    let mut steps = Vec::new();
    for (p, &replacement) in input.planned.iter().zip(replacements) {
        let entry = input.bias.wrapping_add(p.entry);
        if let Some(existing) = state.function(entry) {
            if existing.versions.is_empty() {
                // The route must still be exactly what was written: the
                // entry will jump into it.
                for w in existing.undo.iter().skip(2) {
                    let found = log.mem.read(w.address, w.expected.len())?;
                    if found != w.expected {
                        return Err(EngineError::Failed {
                            pid: input.pid,
                            what: format!(
                                "the dormant route of `{}` at {:#x} was changed (expected {:02x?}, found {found:02x?}); nothing written",
                                existing.name, w.address, w.expected
                            ),
                        });
                    }
                }
                steps.push(Step::Revive {
                    entry,
                    slot: existing.slot,
                    replacement,
                    // The recorded undo starts with the entry bytes, in
                    // revert order: their inverses, reversed, flip it again.
                    entry_bytes: existing.undo.iter().take(2).rev().map(Write::inverse).collect(),
                    live_safe: existing.live_safe,
                });
            } else {
                steps.push(Step::Supersede {
                    entry,
                    slot: existing.slot,
                    replacement,
                });
            }
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
        steps.push(Step::New { entry, flip });
    }
    // The routine that changes live slots, mapped now so that a later
    // failure cannot come from mapping it.
    if let Some(near) = steps
        .iter()
        .find(|s| !matches!(s, Step::New { .. }))
        .map(Step::entry)
    {
        target::store64_many(state, remote, near)?;
    }
    Ok(steps)
}

/// Write the two entry bytes: one at a time with threads running where the
/// order is proven safe, else with every thread stopped and none able to
/// resume between them (its rip, or a return address or signal context on
/// its stack).
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
    let maps = Process::open(pid)?.maps()?;
    let took = stopped::write_stopped(pid, mem, &maps, writes, &[Overwrite { start: at, len: 2 }])?;
    Ok(FlipMode::Stopped {
        stopped_us: took.as_micros() as u64,
    })
}
