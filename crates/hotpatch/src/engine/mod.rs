//! apply, revert, list: the impure edge that loads a patch into a process,
//! flips its functions, and records what it did inside the process.
//!
//! # What `apply` guarantees
//!
//! - Everything that can be checked without touching the process is checked
//!   first: the patch's records, every target name (missing, ambiguous, not
//!   a function, not prepared), the build-id. Any failure: nothing changes.
//! - Then the patch is `dlopen`ed and its pointers filled. The slot, any
//!   trampoline and the padding jump of *every* function are written next;
//!   no thread executes those bytes yet. A failure up to here undoes every
//!   write and `dlclose`s the patch: the target's code is exactly as it was
//!   (the state region and scratch pages, once created, stay mapped).
//! - Last, the entries flip, one function after another (a few µs each):
//!   for that window some functions of the patch are new and some old.
//!   A failure in this phase reverts the functions already flipped. A tool
//!   killed in this phase leaves each function either old or new (each
//!   single-byte state is proven harmless), and the patch recorded as
//!   incomplete; `hotpatch revert` undoes it.
//! - Every byte written is compare-and-swap against the bytes the plan
//!   expects; a mismatch stops with an error naming the address.

mod apply;
pub mod detour;
mod error;
mod revert;
mod target;

pub use apply::{Applied, AppliedFunction, ApplyOptions, FlipMode, apply};
pub use error::EngineError;
pub use revert::{Reverted, Which, revert};

use crate::process::Process;
use crate::state::State;

/// What is applied to process `pid`, as recorded in the process.
pub fn list(pid: i32) -> Result<State, EngineError> {
    let process = Process::open(pid)?;
    let maps = process.maps()?;
    Ok(target::StateRegion::find(pid, &maps)?
        .map(|(_, state)| state)
        .unwrap_or_default())
}
