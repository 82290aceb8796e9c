//! `hotpatch revert PID PATCH-ID` and `--all`.

use super::EngineError;
use super::apply::write_entries;
use super::target::{self, Lock, StateRegion};
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

/// Revert patches of process `pid`.
pub fn revert(pid: i32, which: Which) -> Result<Vec<Reverted>, EngineError> {
    super::in_process(pid, "the revert", || revert_in(pid, which))
}

fn revert_in(pid: i32, which: Which) -> Result<Vec<Reverted>, EngineError> {
    crate::process::preflight::require_patchable(pid, crate::process::preflight::Operation::Revert)?;
    let process = Process::open(pid)?;
    let _lock = Lock::take(pid)?;
    let maps = process.maps()?;
    let Some((mut region, mut state)) = StateRegion::find(pid, &maps)? else {
        return match which {
            Which::Patch(id) => Err(EngineError::NoSuchPatch { pid, id }),
            Which::All => {
                remove_call_regions(pid);
                Ok(Vec::new())
            }
        };
    };
    let ids: Vec<u32> = match which {
        Which::Patch(id) => {
            if state.patch(id).is_none() {
                return Err(EngineError::NoSuchPatch { pid, id });
            }
            vec![id]
        }
        Which::All => state.patches.iter().rev().map(|p| p.id).collect(),
    };
    if ids.is_empty() {
        remove_call_regions(pid);
        return Ok(Vec::new());
    }
    let mem = Mem::open(pid)?;
    let mut remote = Remote::attach(pid, Placement::Anywhere)?;
    let mut out = Vec::new();
    let mut result = Ok(());
    for id in ids {
        match revert_one(pid, &mem, &mut remote, &mut state, id) {
            Ok(r) => {
                out.push(r);
                // Record each patch's removal as it happens.
                if let Err(e) = region.write(&mem, &state) {
                    result = Err(e);
                    break;
                }
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    target::sync_cores(&mut remote, &state);
    // The call region stays mapped for the next run of the tool.
    drop(remote);
    result.map(|()| out)
}

/// `revert --all` with nothing applied also unmaps the remote-call regions
/// earlier runs left mapped (idle ones; see `Remote`).
fn remove_call_regions(pid: i32) {
    match crate::process::remote::remove_regions(pid) {
        Ok(n) => tracing::debug!(pid, removed = n, "call regions removed"),
        Err(e) => tracing::warn!("removing the call regions of process {pid}: {e}"),
    }
}

fn revert_one(
    pid: i32,
    mem: &Mem,
    remote: &mut Remote,
    state: &mut State,
    id: u32,
) -> Result<Reverted, EngineError> {
    let patch = state
        .patch(id)
        .cloned()
        .ok_or(EngineError::NoSuchPatch { pid, id })?;
    let mut reverted = Reverted {
        patch: id,
        restored: Vec::new(),
        stepped_back: Vec::new(),
    };
    // Live slots that step back to an older version, and entries restored:
    // each kind in one batch.
    let mut stores = Vec::new();
    let mut restores: Vec<(usize, EntryFlip)> = Vec::new();
    let recorded = state.index_by_entry();
    for entry in &patch.functions {
        let Some(&index) = recorded.get(entry) else {
            continue;
        };
        let f = &state.functions[index];
        let was_live = f.versions.last().is_some_and(|v| v.patch == id);
        let remaining: Vec<_> = f.versions.iter().filter(|v| v.patch != id).cloned().collect();
        if remaining.is_empty() {
            // The entry goes back (bytes an apply killed early never
            // changed are left as they are). The route stays, dormant.
            let mut restore = f.entry_restore();
            restore.writes.retain(|w| {
                mem.read(w.address, w.new.len())
                    .map(|b| b != w.new)
                    .unwrap_or(true)
            });
            restores.push((index, restore));
        } else {
            if was_live && let Some(top) = remaining.last() {
                stores.push((f.slot, top.replacement));
            }
            reverted.stepped_back.push(f.name.clone());
            state.functions[index].versions = remaining;
        }
    }
    let flips: Vec<EntryFlip> = restores
        .iter()
        .filter(|(_, r)| !r.writes.is_empty())
        .map(|(_, r)| r.clone())
        .collect();
    write_entries(pid, mem, &flips, &mut Vec::new())?;
    for (index, _) in restores {
        state.functions[index].versions.clear();
        reverted.restored.push(state.functions[index].name.clone());
    }
    target::store_slots(state, remote, &stores)?;
    state.patches.retain(|p| p.id != id);
    Ok(reverted)
}
