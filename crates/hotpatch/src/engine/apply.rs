//! `hotpatch apply PID PATCH.so`.

use super::EngineError;
use super::batch;
use super::stopped;
use super::target::{self, Lock, StateRegion};
use super::trip;
use crate::arch::x86_64::{LongJump, relocate::TRAMPOLINE_SIZE};
use crate::image::{Image, ImageFile};
use crate::patchfile::copies::{self, DataCopy};
use crate::patchfile::{CommandLineRecords, PatchFile, PatchSpec, RefKind, Rel64};
use crate::plan::{self, DetourScratch, EntryFlip, FunctionFlip, Method, Planner, Scratch, Subject, Write};
use crate::policy::{Approved, Policy};
use crate::process::{Mem, Placement, Process, Remote};
use crate::state::{FunctionRecord, PatchRecord, State, Version};
use std::time::Instant;

#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Apply even if the patch was made for another build of the image.
    pub force: bool,
    /// Detour unprepared functions even where code of their own image
    /// calls them directly (the register-allocation hazard, DESIGN.md §1).
    pub allow_direct_calls: bool,
    /// Records for a patch without a `.hotpatch` section.
    pub records: CommandLineRecords,
    /// Patch the image mapped at this path (as the process names it)
    /// instead of the one the patch names: `--all` finds images by
    /// build-id, whatever their name (a renamed copy, a container's path).
    pub mapped_image: Option<String>,
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
    /// "prepared" or "detour".
    pub route: &'static str,
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
    /// Trips into the target: remote calls, and the bootstrap of the call
    /// region if this apply made it (each waits for a target thread to be
    /// scheduled; see issue 10, "one trip").
    pub remote_calls: u64,
    /// What looked wrong with the patch but did not stop it.
    pub warnings: Vec<ApplyWarning>,
}

/// Something about a patch that is probably a mistake, but not for
/// certain: said, and the patch applied.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ApplyWarning {
    /// The patch defines a variable with a target variable's name.
    DataCopy {
        message: String,
        #[serde(flatten)]
        copy: DataCopy,
    },
}

impl std::fmt::Display for ApplyWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyWarning::DataCopy { message, .. } => f.write_str(message),
        }
    }
}

/// The patch's variables that copy target variables ([`copies`]), as
/// warnings. Reads the target's symbol tables only when the patch
/// defines a variable worth asking about.
fn data_copy_warnings(pid: i32, file: &PatchFile, spec: &PatchSpec, target: &ImageFile) -> Vec<ApplyWarning> {
    let patch = match Image::parse(file.path(), file.bytes().to_vec()) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(pid, "no check for copied variables: {e}");
            return Vec::new();
        }
    };
    let variables = copies::variables(&patch, spec);
    if variables.is_empty() {
        return Vec::new();
    }
    let names: Vec<&str> = variables.iter().map(|v| v.name.as_str()).collect();
    let hits = match target.symbols_named(&names) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(pid, "no check for copied variables: {e}");
            return Vec::new();
        }
    };
    copies::copies(&patch, &variables, &hits)
        .into_iter()
        .map(|copy| ApplyWarning::DataCopy {
            message: copy.to_string(),
            copy,
        })
        .collect()
}

/// A planned function: everything but the process-dependent addresses.
struct Planned {
    name: String,
    /// Its entry, as a file address.
    entry: u64,
    method: Method,
    replacement_symbol: String,
}

/// 8 bytes of the patch to fill before anything of it runs: a `ref` or
/// `orig` pointer, or a `rel64` site.
struct Fill {
    /// The patch's symbol at the 8 bytes.
    at: String,
    value: PointerValue,
    /// Added to the value.
    addend: i64,
    /// `rel64`: the record (for messages) and the patch's symbol whose
    /// address is subtracted. The 8 bytes must be zero before.
    rel64: Option<(String, String)>,
}

/// What a pointer of the patch gets.
enum PointerValue {
    /// A target symbol's address in the process.
    Address(u64),
    /// The original code of the function `name` whose entry (in the
    /// process) is `entry`: known from the image for a prepared function
    /// (`prepared`), from its route for a detoured one.
    Original {
        name: String,
        entry: u64,
        prepared: Option<u64>,
    },
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

    /// Many writes, batched ([`batch::write_many`]): those that took are
    /// logged, whether the batch succeeds or not.
    fn write_many(&mut self, writes: &[Write]) -> Result<(), EngineError> {
        match batch::write_many(self.mem, writes) {
            Ok(()) => {
                self.done.extend_from_slice(writes);
                Ok(())
            }
            Err(f) => {
                self.done.extend(f.done.iter().map(|&i| writes[i].clone()));
                Err(f.error)
            }
        }
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

/// Apply the patch at `path` to process `pid`: read once, approved by the
/// host's policy ([`Policy::load`] with its defaults), then as
/// [`apply_file`].
pub fn apply(pid: i32, path: &std::path::Path, options: &ApplyOptions) -> Result<Applied, EngineError> {
    let approved = Policy::load(None, None)?.read_and_approve(path)?;
    apply_file(pid, &approved, options)
}

/// Apply an approved patch to process `pid`. The process loads exactly
/// its bytes. The calling thread works at real-time priority meanwhile,
/// where it may ([`crate::process::Boost`]).
pub fn apply_file(pid: i32, patch: &Approved, options: &ApplyOptions) -> Result<Applied, EngineError> {
    let _boost = crate::process::Boost::realtime();
    super::in_process(pid, "the apply", || apply_to(pid, patch, options))
}

fn apply_to(pid: i32, patch: &Approved, options: &ApplyOptions) -> Result<Applied, EngineError> {
    let started = Instant::now();
    let file = patch.file();
    let judged =
        crate::process::preflight::require_patchable(pid, crate::process::preflight::Operation::Apply)?;
    tracing::debug!(pid, us = started.elapsed().as_micros() as u64, "apply: preflight");
    let path = file.path();
    // 1. Everything that needs no change to the process.
    let spec = PatchSpec::from_file(file, &options.records)?;
    let process = Process::open(pid)?;
    let target = target::target_image(&process, spec.target.as_ref(), options.mapped_image.as_deref())?;
    tracing::debug!(
        pid,
        us = started.elapsed().as_micros() as u64,
        "apply: image read"
    );
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
    let names: Vec<&str> = spec
        .replacements
        .iter()
        .map(|r| r.target.as_str())
        .chain(spec.references.iter().map(|r| r.symbol.as_str()))
        .chain(spec.rel64.iter().map(|r| r.symbol.as_str()))
        .collect();
    let planner = Planner::lean(&target.image, &names)?;
    let mut planned: Vec<Planned> = Vec::new();
    let mut by_entry: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
    for r in &spec.replacements {
        let (entry, method) = planner.method(&r.target)?;
        if let Some(other) = by_entry.insert(entry, planned.len()).map(|i| &planned[i]) {
            return Err(EngineError::Failed {
                pid,
                what: format!("`{}` and `{}` are the same function", other.name, r.target),
            });
        }
        planned.push(Planned {
            name: r.target.clone(),
            entry,
            method,
            replacement_symbol: r.replacement.clone(),
        });
    }
    refuse_what_the_tool_runs(&planner, &planned)?;
    let hazards: Vec<String> = planned
        .iter()
        .filter_map(|p| match p.method {
            Method::Detour { direct_calls, .. } if direct_calls > 0 => Some(format!(
                "`{}` ({direct_calls} direct call{})",
                crate::shorten::name(&p.name),
                if direct_calls == 1 { "" } else { "s" }
            )),
            _ => None,
        })
        .collect();
    if !hazards.is_empty() && !options.allow_direct_calls {
        return Err(EngineError::DirectCalls {
            pid,
            image: image_name,
            functions: hazards.join(", "),
        });
    }
    let mut pointers: Vec<Fill> = Vec::new();
    for r in &spec.references {
        let value = match r.kind {
            RefKind::Symbol => {
                PointerValue::Address(target.bias.wrapping_add(planner.symbol(&r.symbol)?.address))
            }
            RefKind::Original => {
                let (entry, method) = planner.method(&r.symbol)?;
                PointerValue::Original {
                    name: r.symbol.clone(),
                    entry: target.bias.wrapping_add(entry),
                    // Just past the entry nops, which do nothing.
                    prepared: match method {
                        Method::Prepared(flip) => Some(target.bias.wrapping_add(flip.short_jump_at + 2)),
                        Method::Detour { .. } => None,
                    },
                }
            }
        };
        pointers.push(Fill {
            at: r.pointer.clone(),
            value,
            addend: r.addend,
            rel64: None,
        });
    }
    // The same lookup as `ref`'s.
    for r in &spec.rel64 {
        pointers.push(Fill {
            at: r.site.clone(),
            value: PointerValue::Address(target.bias.wrapping_add(planner.symbol(&r.symbol)?.address)),
            addend: r.addend,
            rel64: Some((r.symbol.clone(), r.base.clone())),
        });
    }
    let warnings = data_copy_warnings(pid, file, &spec, &target.image);
    tracing::debug!(pid, us = started.elapsed().as_micros() as u64, "apply: planned");

    // 2. Into the process.
    let _lock = Lock::take(pid)?;
    let maps = process.maps()?;
    let (mut region, mut state) = match StateRegion::find(pid, &maps)? {
        Some((r, s)) => (Some(r), s),
        None => (None, State::default()),
    };
    let mut remote = Remote::attach_judged(
        pid,
        Placement::Anywhere,
        judged.scope,
        crate::process::preflight::Operation::Apply,
        maps.clone(),
    )?;
    if let Some(r) = region.as_mut() {
        r.make_private(&mut remote, &state)?;
    }
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
            file,
            build_id: target.image.build_id_hex(),
            sha256: file.sha256_hex(),
            signer: patch.signer().map(str::to_string),
        },
    );
    let remote_calls = remote.trips();
    // The call region stays mapped for the next run of the tool.
    drop(remote);
    let (patch, functions) = result?;
    Ok(Applied {
        pid,
        patch,
        functions,
        elapsed_us: started.elapsed().as_micros() as u64,
        remote_calls,
        warnings,
    })
}

struct ApplyInput<'a> {
    pid: i32,
    spec: &'a PatchSpec,
    image_name: &'a str,
    bias: u64,
    planned: &'a [Planned],
    pointers: &'a [Fill],
    file: &'a PatchFile,
    build_id: Option<String>,
    sha256: String,
    signer: Option<String>,
}

/// What one function of the patch needs.
enum Step {
    /// Never patched: its route to write, then the entry.
    New { entry: u64, flip: FunctionFlip },
    /// Patched before and reverted: its route (padding or dispatcher,
    /// slot, trampoline) is still in place; the slot gets the new code,
    /// then the entry flips again.
    Revive {
        entry: u64,
        slot: u64,
        replacement: u64,
        flip: EntryFlip,
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

    /// The entry flip it makes, if any.
    fn entry_flip(&self) -> Option<&EntryFlip> {
        match self {
            Step::New { flip, .. } => Some(&flip.entry_flip),
            Step::Revive { flip, .. } => Some(flip),
            Step::Supersede { .. } => None,
        }
    }
}

/// Refuse, before anything touches the process, to replace a function
/// the tool itself runs inside it (see [`crate::reserved`]).
fn refuse_what_the_tool_runs(planner: &Planner<'_>, planned: &[Planned]) -> Result<(), EngineError> {
    let entries: Vec<(String, u64)> = planned.iter().map(|p| (p.name.clone(), p.entry)).collect();
    let refused = crate::reserved::refusals(planner, &entries);
    if refused.is_empty() {
        return Ok(());
    }
    let functions: Vec<String> = refused
        .iter()
        .map(|r| {
            format!(
                "`{}` cannot be replaced: {}",
                crate::shorten::name(&r.name),
                r.why
            )
        })
        .collect();
    Err(crate::plan::PlanError::UsedByTheTool {
        image: planner.path().display().to_string(),
        functions: functions.join("; "),
    }
    .into())
}

pub(super) fn dlclose(remote: &mut Remote, handle: u64) {
    if let Ok(f) = remote.libc_function("dlclose") {
        let _ = remote.call(f, &[handle]);
    }
}

/// What each planned function is to this process before anything is
/// loaded: the scratch a new one needs, how many live slots change, and
/// whether any entry flips.
fn needs_of(state: &State, input: &ApplyInput<'_>) -> Needs {
    let recorded = state.index_by_entry();
    let mut needs = Vec::new();
    let mut live_slots = 0;
    let mut entries = false;
    let mut stopped = false;
    for p in input.planned {
        let entry = input.bias.wrapping_add(p.entry);
        match recorded.get(&entry).map(|&i| &state.functions[i]) {
            Some(f) => {
                live_slots += 1;
                if f.versions.is_empty() {
                    entries = true;
                    stopped |= !f.live_safe;
                }
            }
            None => {
                entries = true;
                stopped |= match &p.method {
                    Method::Prepared(flip) => !flip.live_safe(),
                    Method::Detour { .. } => true,
                };
                // In the order `stage` takes them.
                needs.push(target::ScratchNeed {
                    near: entry,
                    executable: false,
                    bytes: 8,
                });
                match &p.method {
                    Method::Prepared(flip) if flip.long_jump == LongJump::Trampoline => {
                        needs.push(target::ScratchNeed {
                            near: entry,
                            executable: true,
                            bytes: 8,
                        })
                    }
                    Method::Prepared(_) => {}
                    Method::Detour { .. } => needs.push(target::ScratchNeed {
                        near: entry,
                        executable: true,
                        bytes: 16 + TRAMPOLINE_SIZE,
                    }),
                }
            }
        }
    }
    Needs {
        scratch: needs,
        live_slots,
        entries,
        stopped,
    }
}

/// What an apply will ask of the target, known before anything is loaded.
struct Needs {
    scratch: Vec<target::ScratchNeed>,
    live_slots: usize,
    /// Some entry flips.
    entries: bool,
    /// Some flip needs every thread stopped: no thread may be lent to a
    /// program then (its own context would be out of the stop's sight).
    stopped: bool,
}

fn apply_in(
    remote: &mut Remote,
    region: &mut Option<StateRegion>,
    state: &mut State,
    input: ApplyInput<'_>,
) -> Result<(PatchRecord, Vec<AppliedFunction>), EngineError> {
    let pid = input.pid;
    let mem = Mem::open(pid)?;
    let maps = Process::open(pid)?.maps()?;
    let needs = needs_of(state, &input);
    let new_scratch = target::plan_scratch(pid, state, &needs.scratch, &maps)?;
    // One trip: the program maps what is missing and loads the patch.
    let loaded = trip::load(
        remote,
        trip::ApplyTrip {
            bytes: input.file.bytes(),
            label: &input.sha256[..16],
            make_region: region.is_none(),
            new_scratch: &new_scratch,
            live_slots: needs.live_slots,
            big_table: trip::big_table(
                state,
                &maps,
                needs.live_slots,
                needs
                    .scratch
                    .iter()
                    .filter(|n| !n.executable)
                    .map(|n| n.bytes)
                    .sum::<u64>()
                    + 64,
            ),
            entries: needs.entries,
            entries_stopped: needs.stopped,
            shootdown_page: trip::shootdown_page(state, &new_scratch, &maps),
        },
    );
    let loaded = match loaded {
        Ok(l) => l,
        Err(failure) => {
            let (e, left) = *failure;
            // What it mapped stays, recorded (an empty state region reads
            // as empty; scratch is reused).
            state.scratch.extend(left.scratch);
            if region.is_none()
                && let Some(address) = left.region
            {
                *region = Some(StateRegion::created(address));
                if let Some(r) = region.as_mut() {
                    let _ = r.write(&mem, state);
                }
            }
            return Err(e);
        }
    };
    let handle = loaded.handle;
    let mut trip = loaded.trip;
    state.scratch.extend(loaded.scratch);
    if region.is_none() {
        *region = loaded.region;
    }
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
    let unload = |trip: &mut trip::Trip<'_>| {
        if let Some(remote) = trip.plain() {
            dlclose(remote, handle);
        }
    };

    // Load: pointers filled, scratch allocated, every step planned. Nothing
    // in the target's code or slots is written yet.
    // The pointers and sites, the `rel64` bases, the replacements (as
    // `stage` takes them).
    let names: Vec<&str> = input
        .pointers
        .iter()
        .map(|f| f.at.as_str())
        .chain(
            input
                .pointers
                .iter()
                .filter_map(|f| f.rel64.as_ref().map(|(_, base)| base.as_str())),
        )
        .chain(input.planned.iter().map(|p| p.replacement_symbol.as_str()))
        .collect();
    let addresses = match trip.file_addresses(handle, &names) {
        Some(a) => Ok(a),
        // Some name needs the target's own dlsym: plain calls from here.
        None => match trip.plain() {
            Some(remote) => remote.dlsym_many(handle, &names).map_err(EngineError::from),
            None => Err(EngineError::Failed {
                pid,
                what: "no session for dlsym".into(),
            }),
        },
    };
    let staged = addresses.and_then(|addresses| {
        if region.is_none()
            && let Some(remote) = trip.plain()
        {
            *region = Some(StateRegion::create(remote)?);
        }
        stage(trip.remote_if_plain(), state, &input, &addresses, &mut log)
    });
    let steps = match staged {
        Ok(steps) => steps,
        Err(e) => {
            log.undo();
            restore(state);
            unload(&mut trip);
            return Err(e);
        }
    };

    // Record the patch, incomplete, before the first write: a tool killed
    // from here on leaves a record that `revert` acts on.
    let id = state.next_patch_id.max(1);
    state.next_patch_id = id + 1;
    let mut record = PatchRecord {
        id,
        // Where the bytes were read from, for people (absolute if possible).
        path: std::fs::canonicalize(input.file.path())
            .unwrap_or_else(|_| input.file.path().to_path_buf())
            .display()
            .to_string(),
        build_id: input.spec.build_id.clone(),
        image: input.image_name.to_string(),
        image_build_id: input.build_id.clone(),
        applied_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        functions: steps.iter().map(Step::entry).collect(),
        handle,
        sha256: Some(input.sha256.clone()),
        signer: input.signer.clone(),
        complete: false,
    };
    // Where each function already recorded is (new ones are pushed after).
    let recorded = state.index_by_entry();
    for step in &steps {
        match step {
            Step::New { entry, flip } => {
                // The entry's undo first (what revert writes), then the
                // route's (the slot is not undone: it only ever holds a
                // pointer).
                let mut undo = flip.entry_flip.inverse().writes;
                undo.extend(flip.prepare.iter().skip(1).rev().map(Write::inverse));
                state.functions.push(FunctionRecord {
                    image: input.image_name.to_string(),
                    name: flip.name.clone(),
                    entry: *entry,
                    slot: flip.slot,
                    route: flip.route,
                    undo,
                    live_safe: flip.entry_flip.live_safe,
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
                if let Some(f) = recorded.get(entry).and_then(|&i| state.functions.get_mut(i)) {
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
        // The routes of new functions: code no thread runs yet, in one
        // batch.
        let routes: Vec<Write> = steps
            .iter()
            .filter_map(|step| match step {
                Step::New { flip, .. } => Some(flip.prepare.iter().cloned()),
                _ => None,
            })
            .flatten()
            .collect();
        log.write_many(&routes)
    });
    if let Err(e) = recorded {
        // No entry flipped: undoing the routes is safe.
        log.undo();
        restore(state);
        let _ = region.write(&mem, state);
        unload(&mut trip);
        return Err(e);
    }

    // 3. The flips. Live slots first (revived routes get their new code
    // before their entries flip; superseded functions switch here), all in
    // one batch of atomic stores; then the entries.
    let flips: Vec<EntryFlip> = steps.iter().filter_map(Step::entry_flip).cloned().collect();
    let mut flipped: Vec<usize> = Vec::new();
    let mut stored: Vec<(u64, u64)> = Vec::new();
    let outcome: Result<Vec<FlipMode>, EngineError> = (|| {
        let mut stores = Vec::new();
        for step in &steps {
            if let Step::Revive {
                slot, replacement, ..
            }
            | Step::Supersede {
                slot, replacement, ..
            } = step
            {
                stores.push((*slot, *replacement));
            }
        }
        let slots: Vec<(u64, usize)> = stores.iter().map(|&(slot, _)| (slot, 8)).collect();
        for (&(slot, _), bytes) in stores.iter().zip(batch::read_many(&mem, &slots)?) {
            let value = <[u8; 8]>::try_from(bytes.as_slice()).map_err(|_| EngineError::Failed {
                pid,
                what: format!("the slot at {slot:#x} could not be read; nothing of the patch is live"),
            })?;
            stored.push((slot, u64::from_le_bytes(value)));
        }
        trip.store_slots(state, &stores)?;
        write_entries(pid, &mem, &flips, &mut flipped)
    })();
    let modes = match outcome {
        Ok(modes) => modes,
        Err(e) => {
            // Entries back first, then live slots back. The routes stay,
            // dormant: a thread may be on its way through one, so they are
            // never torn down under it; a later apply reuses them.
            let undo: Vec<EntryFlip> = flipped.iter().rev().map(|&i| flips[i].inverse()).collect();
            if let Err(u) = write_entries(pid, &mem, &undo, &mut Vec::new()) {
                tracing::error!("rollback of {} entries failed: {u}", undo.len());
            }
            if let Err(u) = trip.store_slots(state, &stored) {
                tracing::error!("rollback of {} live slots failed: {u}", stored.len());
            }
            trip.sync_cores(state);
            for f in &mut state.functions {
                f.versions.retain(|v| v.patch != id);
            }
            state.patches.retain(|p| p.id != id);
            let _ = region.write(&mem, state);
            // Code of the patch may be running (a route was live): it stays loaded.
            if flipped.is_empty() && stored.is_empty() {
                unload(&mut trip);
            }
            return Err(e);
        }
    };
    trip.sync_cores(state);
    let mut modes = modes.into_iter();
    let recorded = state.index_by_entry();
    let mut applied = Vec::new();
    for step in &steps {
        let f = recorded.get(&step.entry()).map(|&i| &state.functions[i]);
        let (replacement, mode) = match step {
            Step::New { flip, .. } => (flip.replacement, modes.next()),
            Step::Revive { replacement, .. } => (*replacement, modes.next()),
            Step::Supersede { replacement, .. } => (*replacement, Some(FlipMode::Superseded)),
        };
        applied.push(AppliedFunction {
            name: f.map(|f| f.name.clone()).unwrap_or_default(),
            entry: step.entry(),
            replacement,
            route: f.map_or("prepared", |f| f.route.name()),
            mode: mode.unwrap_or(FlipMode::Superseded),
        });
    }
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
    mut remote: Option<&mut Remote>,
    state: &mut State,
    input: &ApplyInput<'_>,
    addresses: &[u64],
    log: &mut UndoLog<'_>,
) -> Result<Vec<Step>, EngineError> {
    let bases = input.pointers.iter().filter(|f| f.rel64.is_some()).count();
    if addresses.len() != input.pointers.len() + bases + input.planned.len() {
        return Err(EngineError::Failed {
            pid: input.pid,
            what: "dlsym gave a different number of addresses than names asked".into(),
        });
    }
    let (pointer_at, rest) = addresses.split_at(input.pointers.len());
    let (base_at, replacements) = rest.split_at(bases);
    // `rel64` sites hold zeros until filled: checked before anything is
    // written.
    let sites: Vec<(&Fill, u64)> = input
        .pointers
        .iter()
        .zip(pointer_at)
        .filter(|(f, _)| f.rel64.is_some())
        .map(|(f, &at)| (f, at))
        .collect();
    let ranges: Vec<(u64, usize)> = sites.iter().map(|&(_, at)| (at, 8)).collect();
    for ((fill, at), found) in sites.iter().zip(batch::read_many(log.mem, &ranges)?) {
        if found != [0; 8] {
            let symbol = fill.rel64.as_ref().map_or("", |(symbol, _)| symbol.as_str());
            return Err(EngineError::Failed {
                pid: input.pid,
                what: format!(
                    "`rel64 {symbol}`: the site `{}` at {at:#x} in the loaded patch: expected {} (8 zero bytes), found {} (a site its build did not leave zero); nothing written, the patch is unloaded",
                    fill.at,
                    crate::image::hex(&[0; 8]),
                    crate::image::hex(&found)
                ),
            });
        }
    }
    complete_dormant_routes(state, log)?;
    let mut steps = Vec::new();
    let recorded = state.index_by_entry();
    // The dormant routes this patch revives, read in one batch.
    let revived: Vec<&Write> = input
        .planned
        .iter()
        .filter_map(|p| recorded.get(&input.bias.wrapping_add(p.entry)))
        .map(|&i| &state.functions[i])
        .filter(|f| f.versions.is_empty())
        .flat_map(|f| f.route_undo())
        .collect();
    let ranges: Vec<(u64, usize)> = revived.iter().map(|w| (w.address, w.expected.len())).collect();
    let route_bytes: std::collections::HashMap<u64, Vec<u8>> = revived
        .iter()
        .map(|w| w.address)
        .zip(batch::read_many(log.mem, &ranges)?)
        .collect();
    for (p, &replacement) in input.planned.iter().zip(replacements) {
        let entry = input.bias.wrapping_add(p.entry);
        if let Some(existing) = recorded.get(&entry).map(|&i| &state.functions[i]) {
            if existing.versions.is_empty() {
                // The route must still be exactly what was written: the
                // entry will jump into it.
                for w in existing.route_undo() {
                    let found = route_bytes.get(&w.address).cloned().unwrap_or_default();
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
                    flip: existing.entry_restore().inverse(),
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
        let slot = target::scratch(input.pid, state, remote.as_deref_mut(), entry, false, 8)?;
        let flip = match &p.method {
            Method::Prepared(flip) => {
                let trampoline = match flip.long_jump {
                    LongJump::Trampoline => Some(target::scratch(
                        input.pid,
                        state,
                        remote.as_deref_mut(),
                        entry,
                        true,
                        8,
                    )?),
                    LongJump::Slot => None,
                };
                plan::flip_writes(
                    &p.name,
                    input.image_name,
                    input.bias,
                    flip,
                    replacement,
                    Scratch { slot, trampoline },
                )?
            }
            Method::Detour { detour, code, .. } => {
                // The dispatcher, then the trampoline 16-aligned after it.
                let dispatcher = target::scratch(
                    input.pid,
                    state,
                    remote.as_deref_mut(),
                    entry,
                    true,
                    16 + TRAMPOLINE_SIZE,
                )?;
                plan::detour_writes(
                    Subject {
                        name: &p.name,
                        image: input.image_name,
                        bias: input.bias,
                        entry: p.entry,
                    },
                    detour,
                    code,
                    replacement,
                    DetourScratch {
                        slot,
                        dispatcher,
                        trampoline: dispatcher + 16,
                    },
                )?
            }
        };
        steps.push(Step::New { entry, flip });
    }
    // The patch's pointers, now that every original is known. Nothing of
    // the patch runs yet.
    let mut bases = base_at.iter();
    for (fill, &at) in input.pointers.iter().zip(pointer_at) {
        let value = match &fill.value {
            PointerValue::Address(address) => *address,
            PointerValue::Original {
                name,
                entry,
                prepared,
            } => original_of(&steps, state, *entry)
                .or(*prepared)
                .ok_or_else(|| EngineError::Failed {
                    pid: input.pid,
                    what: format!(
                        "`orig` of `{name}`: an unprepared function has callable original code only once it is detoured, and neither this patch nor an earlier one replaces it (use `ref` to call it as it is); nothing written"
                    ),
                })?,
        };
        let write = match &fill.rel64 {
            None => Write {
                address: at,
                expected: log.mem.read(at, 8)?,
                new: value.wrapping_add_signed(fill.addend).to_le_bytes().to_vec(),
            },
            Some((symbol, base)) => {
                let base_address = bases.next().copied().ok_or_else(|| EngineError::Failed {
                    pid: input.pid,
                    what: format!("`rel64 {symbol}`: no address for the base `{base}`"),
                })?;
                Write {
                    address: at,
                    expected: vec![0; 8],
                    new: Rel64::value(value, fill.addend, base_address)
                        .to_le_bytes()
                        .to_vec(),
                }
            }
        };
        log.write(&write)?;
    }
    // The routine that changes live slots, mapped now so that a later
    // failure cannot come from mapping it.
    // (Only for plain calls: a program stores them itself.)
    if let Some(remote) = remote
        && let Some(near) = steps
            .iter()
            .find(|s| !matches!(s, Step::New { .. }))
            .map(Step::entry)
    {
        target::store64_many(state, remote, near)?;
    }
    Ok(steps)
}

/// Finish the routes of dormant functions that a killed tool left half
/// written (or not written at all): it records an apply before its first
/// write, so a kill before the route is complete leaves a record that a
/// revert then marks dormant. Each route write still holding the original
/// bytes gets the route's bytes (compare-and-swap, logged for undo); no
/// thread runs a route while its entry is original. Writes holding
/// anything else are left for the dormant-route check to refuse.
fn complete_dormant_routes(state: &State, log: &mut UndoLog<'_>) -> Result<(), EngineError> {
    let routes: Vec<(&str, &Write)> = state
        .functions
        .iter()
        .filter(|f| f.versions.is_empty())
        .flat_map(|f| f.route_undo().iter().map(move |w| (f.name.as_str(), w)))
        .collect();
    let ranges: Vec<(u64, usize)> = routes.iter().map(|(_, w)| (w.address, w.new.len())).collect();
    let found = batch::read_many(log.mem, &ranges)?;
    let mut writes = Vec::new();
    for ((name, w), bytes) in routes.iter().zip(found) {
        if bytes == w.new {
            tracing::debug!(
                name,
                at = w.address,
                "completing a dormant route a killed tool left"
            );
            writes.push(w.inverse());
        }
    }
    log.write_many(&writes)
}

/// Where the original code of the function at `entry` is: its route's, if
/// this patch or an earlier one made one.
fn original_of(steps: &[Step], state: &State, entry: u64) -> Option<u64> {
    steps
        .iter()
        .find_map(|s| match s {
            Step::New { entry: e, flip } if *e == entry => Some(flip.original),
            _ => None,
        })
        .or_else(|| state.function(entry).map(|f| f.original))
}

/// Write entry flips: the live-safe ones byte by byte with threads running
/// (each proven harmless in every intermediate state; all entries' first
/// bytes in one batch, then all second bytes, see [`batch::flip_live`]),
/// all the others in one stop of every thread, none able to resume inside
/// the bytes (its rip, or a return address or signal context on its
/// stack). Pushes onto `done` the index of each flip completed; the live
/// ones are all or none (undone before the error returns). Returns each
/// flip's mode, in order.
pub(super) fn write_entries(
    pid: i32,
    mem: &Mem,
    flips: &[EntryFlip],
    done: &mut Vec<usize>,
) -> Result<Vec<FlipMode>, EngineError> {
    let mut modes = vec![FlipMode::Live; flips.len()];
    let stopped: Vec<usize> = (0..flips.len()).filter(|&i| !flips[i].live_safe).collect();
    if !stopped.is_empty() {
        let writes: Vec<Write> = stopped.iter().flat_map(|&i| flips[i].writes.clone()).collect();
        let ranges: Vec<_> = stopped.iter().map(|&i| flips[i].overwrite).collect();
        let maps = Process::open(pid)?.maps()?;
        let took = stopped::write_stopped(pid, mem, &maps, &writes, &ranges)?;
        for &i in &stopped {
            modes[i] = FlipMode::Stopped {
                stopped_us: took.as_micros() as u64,
            };
            done.push(i);
        }
    }
    // The live ones together, each entry still in its proven byte order.
    let live: Vec<usize> = (0..flips.len()).filter(|&i| flips[i].live_safe).collect();
    let refs: Vec<&EntryFlip> = live.iter().map(|&i| &flips[i]).collect();
    batch::flip_live(mem, &refs)?;
    done.extend(live);
    Ok(modes)
}
