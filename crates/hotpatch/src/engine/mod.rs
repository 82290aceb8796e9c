//! apply, revert, list: the impure edge that loads a patch into a process,
//! flips its functions, and records what it did inside the process.
//!
//! # What `apply` guarantees
//!
//! - Everything that can be checked without touching the process is checked
//!   first: the patch's records, every target name (missing, ambiguous, not
//!   a function, not patchable and why), the build-id, and the
//!   register-allocation hazard of unprepared functions called directly
//!   from their own image (refused without `allow_direct_calls`). Any
//!   failure: nothing changes.
//! - Then the patch is `dlopen`ed and its pointers filled. The route of
//!   *every* function is written next — slot, trampoline and padding jump
//!   (prepared), or slot, dispatcher and trampoline holding the relocated
//!   first instructions (detour); no thread executes those bytes yet. A failure up to here undoes every
//!   write and `dlclose`s the patch: the target's code is exactly as it was
//!   (the state region and scratch pages, once created, stay mapped).
//! - The patch is recorded (as incomplete) inside the process before the
//!   first of those writes, so a tool killed from then on leaves a record
//!   that `hotpatch revert` acts on.
//! - Last, the entries flip. Every entry that cannot change with threads
//!   running — a detour's 5-byte jump, a prepared entry whose byte order is
//!   not proven safe — changes in one stop of every thread, all or none,
//!   and only when no thread can resume inside the bytes (its rip, a return
//!   address or a signal context on its stack); the tool retries a bounded
//!   number of times, then gives up naming the thread. Then the prepared
//!   entries flip live, all together one byte position at a time (every
//!   entry's first write in one batch of page-sized writes, then every
//!   second: each entry still passes only through its proven states): for
//!   that window some functions of the patch are new and some old. A
//!   failure in this phase reverts the functions already flipped. A tool
//!   killed in this phase leaves each function either old or new (each
//!   single-byte state is proven harmless; a stopped write is done before
//!   the threads resume, and the kernel resumes them if the tool dies).
//!
//! # What `revert` does
//!
//! The entry goes back to its original bytes (the same proven byte order,
//! or all threads stopped). The route behind it — padding jump or
//! dispatcher, slot, trampoline — stays, dormant: a thread that took the route just before
//! the entry changed may still be on its way through it, so it is never
//! torn down under it (that thread finishes the call in the reverted code,
//! which stays loaded). Applying a patch to the function again reuses the
//! route: one atomic slot store, then the entry flips.
//! - Every byte written is compare-and-swap against the bytes the plan
//!   expects; a mismatch stops with an error naming the address.
//! - The record comes from the process, which can write anything there:
//!   one the tool would never write is refused ([`State::check`]), and
//!   before anything is written every entry the revert goes back on is
//!   compared with the record ([`crate::entry_state`]): patched, original,
//!   or between the two (a flip cut short: only the writes left are done);
//!   anything else refuses the whole revert, naming the function, its
//!   address and the bytes. `revert --all` also reverts patches that only
//!   a function's versions still name.

mod apply;
mod batch;
mod error;
pub mod host;
mod revert;
mod status;
pub mod stopped;
mod target;
mod trip;

pub use apply::{Applied, AppliedFunction, ApplyOptions, ApplyWarning, FlipMode, apply, apply_file};
pub use error::EngineError;
pub use revert::{Reverted, Reverts, Which, revert};
pub use status::{ProcessStatus, patched_processes};

use crate::entry_state::{EntryCheck, check_entry};
use crate::process::{Mem, Process};
use crate::state::State;

/// What is recorded in a process, and whether its code agrees.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Listing {
    #[serde(flatten)]
    pub state: State,
    /// Each recorded function's entry compared with its record.
    pub entries: Vec<EntryCheck>,
}

impl Listing {
    /// The check of the function whose entry is `entry`.
    pub fn entry(&self, entry: u64) -> Option<&EntryCheck> {
        self.entries.iter().find(|e| e.entry == entry)
    }
}

/// What is applied to process `pid`, as recorded in the process, with
/// each recorded function's entry bytes compared with the record.
pub fn list_checked(pid: i32) -> Result<Listing, EngineError> {
    in_process(pid, "the list", || {
        let process = Process::open(pid)?;
        let maps = process.maps()?;
        let Some((_, state)) = target::StateRegion::find(pid, &maps)? else {
            return Ok(Listing::default());
        };
        let mem = Mem::open(pid)?;
        let mut read = |address, len| mem.read(address, len);
        let entries = state
            .functions
            .iter()
            .map(|f| check_entry(f, &mut read)?.map_err(EngineError::state(pid)))
            .collect::<Result<Vec<_>, EngineError>>()?;
        Ok(Listing { state, entries })
    })
}

/// What is applied to process `pid`, as recorded in the process.
pub fn list(pid: i32) -> Result<State, EngineError> {
    in_process(pid, "the list", || {
        let process = Process::open(pid)?;
        let maps = process.maps()?;
        Ok(target::StateRegion::find(pid, &maps)?
            .map(|(_, state)| state)
            .unwrap_or_default())
    })
}

/// Run `work` on process `pid`; if it fails because the process exited
/// meanwhile, say so (the symptom — a short write, an empty map — would
/// hide the reason).
pub(crate) fn in_process<T>(
    pid: i32,
    during: &'static str,
    work: impl FnOnce() -> Result<T, EngineError>,
) -> Result<T, EngineError> {
    work().map_err(|e| {
        // (A refusal names the process's state itself.)
        let never_there = matches!(
            e,
            EngineError::Process(
                crate::process::ProcessError::NoSuchProcess { .. }
                    | crate::process::ProcessError::NotPatchable { .. }
            )
        );
        if !never_there && process_gone(pid) {
            EngineError::Exited {
                pid,
                during,
                error: Box::new(e),
            }
        } else {
            e
        }
    })
}

/// The process no longer exists, or is a zombie (exited, not yet reaped).
fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            crate::process::threads::parse_stat_state(&stat).is_some_and(|s| matches!(s, 'Z' | 'X' | 'x'))
        }
        Err(_) => true,
    }
}
