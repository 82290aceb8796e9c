//! Helpers shared by the test suites of `hotpatch` and `hotpatch-cli`
//! (dev-only, never published).
//!
//! - [`build`]: C (and Rust) targets and patch libraries compiled at test
//!   time, and the `include/` directory of `hotpatch.h`.
//! - [`proc`]: child processes killed and reaped on drop, pass or fail, with
//!   bounded waits on their output; commands that must succeed.
//! - [`rng`]: a small seeded generator whose seed is printed, so a run can
//!   be repeated.
//! - [`oracle`]: what a target looks like, read straight from `/proc`
//!   (memory, mappings, thread states), never through `hotpatch`.
//! - [`fields`]: `key=value` fields of the lines targets print.
//! - [`fifo`]: named pipes for targets that block on one.
//!
//! It does not depend on `hotpatch`: the oracles must not share the code
//! they check, and there is no dependency cycle.

pub mod build;
pub mod fields;
pub mod fifo;
pub mod oracle;
pub mod proc;
pub mod rng;
