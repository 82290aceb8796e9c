use crate::image::{ImageError, LookupError};
use crate::patchfile::PatchError;
use crate::plan::PlanError;
use crate::process::ProcessError;
use crate::state::StateError;

/// Why apply, revert or list failed. Each names the process, file or
/// function it is about.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    #[error(transparent)]
    Patch(#[from] PatchError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error("process {pid}: hotpatch state record: {error}")]
    State { pid: i32, error: StateError },
    #[error("process {pid}: no mapped image is `{image}` (mapped: {mapped})")]
    ImageNotMapped { pid: i32, image: String, mapped: String },
    #[error(
        "{patch}: made for build-id {wanted}, but process {pid} runs {image} with build-id {found}; --force applies it anyway"
    )]
    BuildIdMismatch {
        patch: String,
        pid: i32,
        image: String,
        wanted: String,
        found: String,
    },
    #[error(
        "process {pid}: {functions} in {image}: built without padding and called directly from code of the same image. With gcc's interprocedural register allocation (-fipa-ra, on at -O2) such a caller may keep values in registers the ABI lets a function clobber, and a replacement may corrupt them. Check that each replacement preserves the registers its original does (or that the image was built with clang or -fno-ipa-ra), then apply with --allow-direct-calls; nothing was changed"
    )]
    DirectCalls {
        pid: i32,
        image: String,
        functions: String,
    },
    #[error("process {pid}: no patch {id} is applied (`hotpatch list {pid}` shows what is)")]
    NoSuchPatch { pid: i32, id: u32 },
    #[error("process {pid}: another hotpatch is working on it (lock {lock})")]
    Busy { pid: i32, lock: String },
    #[error("process {pid}: {what}")]
    Failed { pid: i32, what: String },
    #[error("{patch}: cannot be applied to every process: {why}; nothing was changed")]
    NotForEveryProcess { patch: String, why: String },
    #[error("process {pid} exited during {during}: {error}")]
    Exited {
        pid: i32,
        during: &'static str,
        error: Box<EngineError>,
    },
}

impl EngineError {
    pub(crate) fn state(pid: i32) -> impl FnOnce(StateError) -> EngineError {
        move |error| EngineError::State { pid, error }
    }
}
