//! `hotpatch revert PID PATCH-ID` and `--all`.

use super::EngineError;
use super::apply::write_entries;
use super::target::{Lock, StateRegion};
use super::trip;
use crate::entry_state::{self, EntryState, RevertRefused};
use crate::plan::EntryFlip;
use crate::process::{Mem, Placement, Process, Remote};
use crate::state::State;

/// Which patches to revert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Patch(u32),
    /// Every patch, newest first.
    All,
}

/// What reverting one patch did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Reverted {
    pub patch: u32,
    /// Functions back to their original code.
    pub restored: Vec<String>,
    /// Functions now running an older patch's version.
    pub stepped_back: Vec<String>,
}

/// What one `revert` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Reverts {
    pub pid: i32,
    /// Each patch reverted, in the order reverted (newest first).
    pub reverted: Vec<Reverted>,
    /// Trips into the target, as [`super::Applied::remote_calls`]; 0 when
    /// there was nothing to revert.
    pub remote_calls: u64,
}

/// Revert patches of process `pid`. The calling thread works at
/// real-time priority meanwhile, where it may ([`crate::process::Boost`]).
pub fn revert(pid: i32, which: Which) -> Result<Reverts, EngineError> {
    let _boost = crate::process::Boost::realtime();
    super::in_process(pid, "the revert", || revert_in(pid, which))
}

fn revert_in(pid: i32, which: Which) -> Result<Reverts, EngineError> {
    let nothing = || Reverts {
        pid,
        reverted: Vec::new(),
        remote_calls: 0,
    };
    let judged =
        crate::process::preflight::require_patchable(pid, crate::process::preflight::Operation::Revert)?;
    let process = Process::open(pid)?;
    let _lock = Lock::take(pid)?;
    let maps = process.maps()?;
    let Some((mut region, mut state)) = StateRegion::find(pid, &maps)? else {
        return match which {
            Which::Patch(id) => Err(EngineError::NoSuchPatch { pid, id }),
            Which::All => {
                remove_call_regions(pid);
                Ok(nothing())
            }
        };
    };
    let ids: Vec<u32> = match which {
        Which::Patch(id) => {
            if state.patch(id).is_none() && entry_state::functions_of(&state, id).is_empty() {
                return Err(EngineError::NoSuchPatch { pid, id });
            }
            vec![id]
        }
        // Also patches only a function's versions name (their own record
        // lost): code the record says is patched is never left so.
        Which::All => entry_state::all_patches(&state),
    };
    if ids.is_empty() {
        remove_call_regions(pid);
        return Ok(nothing());
    }
    let mem = Mem::open(pid)?;
    // Every entry the revert goes back on must be what the record says
    // (patched, original, or between): else nothing is written at all.
    for &id in &ids {
        for index in entry_state::functions_of(&state, id) {
            let f = &state.functions[index];
            let span = entry_state::EntrySpan::of(f).map_err(EngineError::state(pid))?;
            let found = mem.read(span.start, span.len())?;
            if span.classify(&found) == EntryState::Drifted {
                return Err(refused(
                    pid,
                    RevertRefused::Drifted {
                        name: crate::state::short(&f.name),
                        address: span.start,
                        patched: span.hex(0),
                        original: span.hex(span.states.len() - 1),
                        found: crate::image::hex(&found),
                    },
                ));
            }
        }
    }
    let mut remote = Remote::attach_judged(
        pid,
        Placement::Anywhere,
        judged.scope,
        crate::process::preflight::Operation::Revert,
        maps.clone(),
    )?;
    region.make_private(&mut remote, &state)?;
    let mut out = Vec::new();
    let mut result = Ok(());
    let mut stores = Vec::new();
    for id in ids {
        match revert_one(pid, &mem, &mut state, id, &mut stores) {
            Ok(r) => out.push(r),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    // One trip for every live slot that steps back and the core sync;
    // then the record says what is now true.
    let stepped = trip::stores_and_sync(&mut remote, &mut state, &stores);
    let recorded = region.write(&mem, &state);
    let remote_calls = remote.trips();
    // The call region stays mapped for the next run of the tool.
    drop(remote);
    result.and(stepped).and(recorded).map(|()| Reverts {
        pid,
        reverted: out,
        remote_calls,
    })
}

fn refused(pid: i32, why: RevertRefused) -> EngineError {
    match why {
        RevertRefused::NoSuchPatch(id) => EngineError::NoSuchPatch { pid, id },
        RevertRefused::Record(error) => EngineError::State { pid, error },
        why @ RevertRefused::Drifted { .. } => EngineError::Failed {
            pid,
            what: why.to_string(),
        },
    }
}

/// `revert --all` with nothing applied also unmaps the remote-call regions
/// earlier runs left mapped (idle ones; see `Remote`).
fn remove_call_regions(pid: i32) {
    match crate::process::remote::remove_regions(pid) {
        Ok(n) => tracing::debug!(pid, removed = n, "call regions removed"),
        Err(e) => tracing::warn!("removing the call regions of process {pid}: {e}"),
    }
}

/// Restore the entries patch `id` holds alone and update `state`; the live
/// slots that step back to an older version are added to `stores` (they
/// change after the entries, in the revert's one trip).
fn revert_one(
    pid: i32,
    mem: &Mem,
    state: &mut State,
    id: u32,
    stores: &mut Vec<(u64, u64)>,
) -> Result<Reverted, EngineError> {
    let plan = entry_state::plan_revert(state, id, &mut |address, len| mem.read(address, len))?
        .map_err(|why| refused(pid, why))?;
    let mut reverted = Reverted {
        patch: id,
        restored: Vec::new(),
        stepped_back: Vec::new(),
    };
    // Live slots that step back to an older version, and entries restored:
    // each kind in one batch.
    let flips: Vec<EntryFlip> = plan
        .restores
        .iter()
        .filter(|(_, r)| !r.writes.is_empty())
        .map(|(_, r)| r.clone())
        .collect();
    write_entries(pid, mem, &flips, &mut Vec::new())?;
    for (index, _) in &plan.restores {
        if let Some(f) = state.functions.get_mut(*index) {
            f.versions.clear();
            reverted.restored.push(f.name.clone());
        }
    }
    for (index, versions) in plan.stepped_back {
        if let Some(f) = state.functions.get_mut(index) {
            f.versions = versions;
            reverted.stepped_back.push(f.name.clone());
        }
    }
    stores.extend(plan.stores.iter().copied());
    state.patches.retain(|p| p.id != id);
    Ok(reverted)
}
