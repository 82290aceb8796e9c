//! `hotpatch apply`, `list` and `revert`.

use anyhow::{Result, bail};
use hotpatch::engine::{self, ApplyOptions, FlipMode, Which};
use hotpatch::entry_state::{EntryCheck, EntryState};
use hotpatch::patchfile::CommandLineRecords;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ApplyArgs {
    /// The process to patch.
    pid: i32,
    /// The patch: a shared library (see include/hotpatch.h).
    patch: PathBuf,
    /// For a library without a .hotpatch section: TARGET=REPLACEMENT (repeatable).
    #[arg(long = "replace", value_name = "TARGET=REPLACEMENT")]
    replace: Vec<String>,
    /// Fill the library's pointer variable with a target symbol's address (repeatable).
    #[arg(long = "ref", value_name = "SYMBOL=POINTER")]
    refs: Vec<String>,
    /// Fill the library's pointer variable with a target function's original code (repeatable).
    #[arg(long = "orig", value_name = "FUNCTION=POINTER")]
    origs: Vec<String>,
    /// Apply even if the patch was made for another build-id of the image.
    #[arg(long)]
    force: bool,
    /// Detour unprepared functions that code of their own image calls
    /// directly (its callers may rely on registers the ABI does not
    /// promise; see `hotpatch check --functions`).
    #[arg(long)]
    allow_direct_calls: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct ListArgs {
    pid: i32,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct RevertArgs {
    pid: i32,
    /// The patch id (from `hotpatch list`).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    patch_id: Option<u32>,
    /// Revert every patch, newest first.
    #[arg(long)]
    all: bool,
    #[arg(long)]
    json: bool,
}

pub fn apply(args: ApplyArgs) -> Result<()> {
    let options = ApplyOptions {
        force: args.force,
        allow_direct_calls: args.allow_direct_calls,
        records: CommandLineRecords {
            replace: args.replace,
            refs: args.refs,
            origs: args.origs,
        },
        signer: None,
    };
    let applied = engine::apply(args.pid, &args.patch, &options)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&applied)?);
        return Ok(());
    }
    println!(
        "process {}: patch {} applied ({} in {:.2} ms)",
        applied.pid,
        applied.patch.id,
        applied.patch.path,
        applied.elapsed_us as f64 / 1000.0
    );
    for f in &applied.functions {
        let how = match f.mode {
            FlipMode::Live => "live, no thread stopped".to_string(),
            FlipMode::Stopped { stopped_us } => format!("threads stopped for {stopped_us} µs"),
            FlipMode::Superseded => "supersedes the previous patch".to_string(),
        };
        println!(
            "  {} at {:#x} -> {:#x} ({}, {how})",
            f.name, f.entry, f.replacement, f.route
        );
    }
    Ok(())
}

pub fn list(args: ListArgs) -> Result<()> {
    let listing = engine::list_checked(args.pid)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&listing)?);
        return Ok(());
    }
    let state = &listing.state;
    if state.patches.is_empty() {
        println!("process {}: no patches applied", args.pid);
    } else {
        println!("process {}: {} patch(es)", args.pid, state.patches.len());
    }
    for p in &state.patches {
        println!(
            "  patch {}: {} on {}{}",
            p.id,
            p.path,
            p.image,
            if p.complete {
                ""
            } else {
                "  (INCOMPLETE: the tool stopped during apply; revert it)"
            }
        );
        for entry in &p.functions {
            if let Some(f) = state.function(*entry) {
                let live = f.versions.last().is_some_and(|v| v.patch == p.id);
                println!(
                    "    {} at {:#x} ({}{}){}",
                    f.name,
                    f.entry,
                    f.route.name(),
                    listing.entry(f.entry).map(entry_note).unwrap_or_default(),
                    if live {
                        ""
                    } else {
                        "  (superseded by a newer patch)"
                    },
                );
            }
        }
    }
    // Functions no patch record lists (a patch recorded only in their
    // versions), or recorded as reverted, whose code is not original.
    let listed = |entry: u64| state.patches.iter().any(|p| p.functions.contains(&entry));
    for check in listing
        .entries
        .iter()
        .filter(|e| !listed(e.entry))
        .filter(|e| e.recorded_patched || e.state != EntryState::Original)
    {
        println!(
            "  {} at {:#x} (recorded as {}{})",
            check.name,
            check.entry,
            if check.recorded_patched {
                "patched by a patch with no record"
            } else {
                "reverted"
            },
            entry_note(check)
        );
    }
    Ok(())
}

/// How a function's entry compares with its record, for people: its
/// state, and the bytes when they are not what the record says.
fn entry_note(check: &EntryCheck) -> String {
    let state = match check.state {
        EntryState::Patched => "patched",
        EntryState::Original => "original",
        EntryState::Partly { .. } => "HALF FLIPPED",
        EntryState::Drifted => "DRIFTED",
    };
    if check.agrees() {
        return format!(", entry {state}");
    }
    format!(
        ", entry {state}: {:#x} holds {}; patched is {}, original {}",
        check.address, check.found, check.patched, check.original
    )
}

pub fn revert(args: RevertArgs) -> Result<()> {
    let which = match (args.patch_id, args.all) {
        (_, true) => Which::All,
        (Some(id), false) => Which::Patch(id),
        (None, false) => bail!("give a PATCH-ID or --all"),
    };
    let reverted = engine::revert(args.pid, which)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reverted)?);
        return Ok(());
    }
    if reverted.is_empty() {
        println!("process {}: nothing to revert", args.pid);
    }
    for r in &reverted {
        println!("process {}: patch {} reverted", args.pid, r.patch);
        for name in &r.restored {
            println!("  {name}: original code");
        }
        for name in &r.stepped_back {
            println!("  {name}: back to the previous patch");
        }
    }
    Ok(())
}
