//! `hotpatch`: redirect the functions of a running Linux x86-64 process.
//!
//! The crate is layered as `DESIGN.md` §6 describes: pure layers hold the
//! logic ([`image`], [`arch`], [`patchability`], [`prepare`]) and thin impure
//! edges do I/O ([`process`]). The `hotpatch` command is a separate crate.

pub mod arch;
pub mod audit;
pub mod engine;
pub mod entry_state;
pub mod image;
pub mod patchability;
pub mod patchfile;
pub mod plan;
pub mod policy;
pub mod prepare;
pub mod process;
pub mod reserved;
pub mod seccomp;
pub mod shorten;
pub mod spans;
pub mod state;

pub use patchability::{ImageReport, survey};

pub use image::{Image, ImageError};
