//! `hotpatch apply`, `list` and `revert`.

use crate::audit;
use crate::output;
use crate::signing::TrustArgs;
use anyhow::{Result, anyhow, bail};
use hotpatch::audit::{Outcome, Record};
use hotpatch::engine::{self, Applied, ApplyOptions, FlipMode, Which};
use hotpatch::entry_state::{EntryCheck, EntryState};
use hotpatch::patchfile::CommandLineRecords;
use hotpatch::policy::{Policy, PolicyError, rules::DEFAULT_AUDIT_SOCKET, trusted_file};
use hotpatch::shorten::name;
use hotpatch::state::PatchRecord;
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ApplyArgs {
    /// The process to patch (none with --all).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pid: Option<i32>,
    /// The patch: a shared library (see include/hotpatch.h).
    patch: PathBuf,
    /// Every process of the host that maps the patch's target image, found
    /// by its build-id (processes in containers too), in parallel; the
    /// policy's [exclude] rules are honoured. Running it again skips the
    /// processes already patched.
    #[arg(long)]
    all: bool,
    /// Processes worked on at once with --all (default: one per CPU).
    #[arg(long, value_name = "N", requires = "all")]
    jobs: Option<usize>,
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
    #[arg(required_unless_present = "everywhere")]
    pid: Option<i32>,
    /// The patch id (from `hotpatch list`).
    #[arg(required_unless_present_any = ["all", "everywhere"], conflicts_with = "all")]
    patch_id: Option<u32>,
    /// Revert every patch of the process, newest first.
    #[arg(long)]
    all: bool,
    /// Revert this patch (its file, or its SHA-256) in every process of the
    /// host that holds it.
    #[arg(long, value_name = "PATCH|SHA256", conflicts_with_all = ["pid", "patch_id", "all"])]
    everywhere: Option<String>,
    /// Processes worked on at once with --everywhere (default: one per CPU).
    #[arg(long, value_name = "N", requires = "everywhere")]
    jobs: Option<usize>,
    #[arg(long)]
    json: bool,
}

/// `apply`: read the patch once, let the policy approve it, apply exactly
/// those bytes, and log the outcome (refused, failed or ok) for the audit.
pub fn apply(args: ApplyArgs, trust: &TrustArgs) -> Result<()> {
    let Some(pid) = args.pid else {
        return crate::host::apply_all(
            &args.patch,
            &options_of(&args),
            trust.load(),
            args.jobs.unwrap_or_else(crate::host::default_jobs),
            args.json,
        );
    };
    let mut record = Record::now("apply", pid);
    record.patch = Some(args.patch.display().to_string());
    let policy = trust.load();
    let socket = policy.as_ref().map_or_else(
        |_| PathBuf::from(DEFAULT_AUDIT_SOCKET),
        |p| p.audit_socket().to_path_buf(),
    );
    let result = approve_and_apply(pid, &args, policy, &mut record);
    record.outcome = match &result {
        Ok(_) => Outcome::Ok,
        Err(Failure::Refused(e)) => Outcome::Refused(e.clone()),
        Err(Failure::Failed(e)) => Outcome::Failed(format!("{e:#}")),
    };
    audit::log(&socket, &record);
    let applied = result.map_err(|e| match e {
        Failure::Refused(e) => anyhow!(e),
        Failure::Failed(e) => e,
    })?;
    print_applied(&applied, args.json)
}

/// The answer of `apply`; the patch is applied whether or not it can be written.
fn print_applied(applied: &Applied, json: bool) -> Result<()> {
    let mut text = String::new();
    if json {
        writeln!(text, "{}", serde_json::to_string_pretty(applied)?)?;
    } else {
        // Said, not refused: the patch is applied (`warnings` in --json).
        for w in &applied.warnings {
            output::warn(&format!("hotpatch: warning: {}: {w}", name(&applied.patch.path)));
        }
        writeln!(
            text,
            "process {}: patch {} applied ({}{} in {:.2} ms)",
            applied.pid,
            applied.patch.id,
            name(&applied.patch.path),
            applied
                .patch
                .signer
                .as_ref()
                .map_or_else(String::new, |s| format!(", signed by {}", name(s))),
            applied.elapsed_us as f64 / 1000.0
        )?;
        for f in &applied.functions {
            let how = match f.mode {
                FlipMode::Live => "live, no thread stopped".to_string(),
                FlipMode::Stopped { stopped_us } => format!("threads stopped for {stopped_us} µs"),
                FlipMode::Superseded => "supersedes the previous patch".to_string(),
            };
            writeln!(
                text,
                "  {} at {:#x} -> {:#x} ({}, {how})",
                name(&f.name),
                f.entry,
                f.replacement,
                f.route
            )?;
        }
    }
    output::emit(&text, || {
        Some(format!(
            "patch {} WAS applied to process {}",
            applied.patch.id, applied.pid
        ))
    })?;
    Ok(())
}

enum Failure {
    /// By the policy, before anything touched the process.
    Refused(String),
    Failed(anyhow::Error),
}

fn approve_and_apply(
    pid: i32,
    args: &ApplyArgs,
    policy: Result<Policy, PolicyError>,
    record: &mut Record,
) -> Result<Applied, Failure> {
    let refused = |e: PolicyError| {
        if e.is_refusal() {
            Failure::Refused(format!("{e}; nothing in process {pid} was changed"))
        } else {
            Failure::Failed(anyhow!(e))
        }
    };
    let policy = policy.map_err(refused)?;
    let file = trusted_file::read_patch(&args.patch).map_err(refused)?;
    record.sha256 = Some(file.sha256_hex());
    let approved = policy.approve(file).map_err(refused)?;
    record.signer = approved.signer().map(str::to_string);
    let applied =
        engine::apply_file(pid, &approved, &options_of(args)).map_err(|e| Failure::Failed(e.into()))?;
    record.image = Some(applied.patch.image.clone());
    record.image_build_id = applied.patch.image_build_id.clone();
    record.patch_id = Some(applied.patch.id.to_string());
    Ok(applied)
}

fn options_of(args: &ApplyArgs) -> ApplyOptions {
    ApplyOptions {
        force: args.force,
        allow_direct_calls: args.allow_direct_calls,
        records: CommandLineRecords {
            replace: args.replace.clone(),
            refs: args.refs.clone(),
            origs: args.origs.clone(),
        },
        mapped_image: None,
    }
}

pub fn list(args: ListArgs) -> Result<()> {
    let listing = engine::list_checked(args.pid)?;
    let text = list_text(args.pid, &listing, args.json)?;
    output::emit(&text, || None)?;
    Ok(())
}

fn list_text(pid: i32, listing: &engine::Listing, json: bool) -> Result<String> {
    let mut text = String::new();
    if json {
        writeln!(text, "{}", serde_json::to_string_pretty(listing)?)?;
        return Ok(text);
    }
    let state = &listing.state;
    if state.patches.is_empty() {
        writeln!(text, "process {pid}: no patches applied")?;
    } else {
        writeln!(text, "process {pid}: {} patch(es)", state.patches.len())?;
    }
    for p in &state.patches {
        let origin = match (&p.sha256, &p.signer) {
            (Some(sha), Some(signer)) => format!(" (sha256 {}, signed by {})", short(sha), name(signer)),
            (Some(sha), None) => format!(" (sha256 {}, unsigned)", short(sha)),
            (None, Some(signer)) => format!(" (signed by {})", name(signer)),
            (None, None) => String::new(),
        };
        writeln!(
            text,
            "  patch {}: {} on {}{origin}{}",
            p.id,
            name(&p.path),
            name(&p.image),
            if p.complete {
                ""
            } else {
                "  (INCOMPLETE: the tool stopped during apply; revert it)"
            }
        )?;
        function_lines(&mut text, listing, p)?;
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
        writeln!(
            text,
            "  {} at {:#x} (recorded as {}{})",
            name(&check.name),
            check.entry,
            if check.recorded_patched {
                "patched by a patch with no record"
            } else {
                "reverted"
            },
            entry_note(check)
        )?;
    }
    Ok(text)
}

/// A line per function of `patch`: where, how, its entry checked, and
/// whether a newer patch superseded it.
pub(crate) fn function_lines(
    text: &mut String,
    listing: &engine::Listing,
    patch: &PatchRecord,
) -> Result<()> {
    for entry in &patch.functions {
        if let Some(f) = listing.state.function(*entry) {
            let live = f.versions.last().is_some_and(|v| v.patch == patch.id);
            writeln!(
                text,
                "    {} at {:#x} ({}{}){}",
                name(&f.name),
                f.entry,
                f.route.name(),
                listing.entry(f.entry).map(entry_note).unwrap_or_default(),
                if live {
                    ""
                } else {
                    "  (superseded by a newer patch)"
                },
            )?;
        }
    }
    Ok(())
}

/// The first 16 hex digits of a SHA-256.
pub(crate) fn short(sha: &str) -> &str {
    sha.get(..16).unwrap_or(sha)
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

/// `revert`, with one audit record per reverted patch (or one for the
/// failure).
pub fn revert(args: RevertArgs, trust: &TrustArgs) -> Result<()> {
    if let Some(which) = &args.everywhere {
        let policy = trust.load().ok();
        return crate::host::revert_everywhere(
            which,
            policy.as_ref(),
            args.jobs.unwrap_or_else(crate::host::default_jobs),
            args.json,
        );
    }
    let Some(pid) = args.pid else {
        bail!("give a PID, or --everywhere PATCH");
    };
    let which = match (args.patch_id, args.all) {
        (_, true) => Which::All,
        (Some(id), false) => Which::Patch(id),
        (None, false) => bail!("give a PATCH-ID or --all"),
    };
    // A revert needs no approval: the policy only says where to log.
    let socket = match trust.load() {
        Ok(p) => p.audit_socket().to_path_buf(),
        Err(e) => {
            output::warn(&format!(
                "hotpatch: warning: {e}; audit records go to {DEFAULT_AUDIT_SOCKET}"
            ));
            PathBuf::from(DEFAULT_AUDIT_SOCKET)
        }
    };
    // What the records say before, for the audit.
    let before = engine::list(pid).ok();
    let recorded = |id: u32| {
        let base = Record::now("revert", pid);
        match before
            .as_ref()
            .and_then(|s| s.patches.iter().find(|p| p.id == id))
        {
            Some(p) => base.with_patch(p),
            None => Record {
                patch_id: Some(id.to_string()),
                ..base
            },
        }
    };
    let result = engine::revert(pid, which);
    match &result {
        Ok(reverts) if !reverts.reverted.is_empty() => {
            for r in &reverts.reverted {
                audit::log(&socket, &recorded(r.patch));
            }
        }
        outcome => {
            let mut record = match args.patch_id {
                Some(id) if !args.all => recorded(id),
                _ => Record {
                    patch_id: Some("all".into()),
                    ..Record::now("revert", pid)
                },
            };
            if let Err(e) = outcome {
                record.outcome = Outcome::Failed(e.to_string());
            }
            audit::log(&socket, &record);
        }
    }
    let reverts = result?;
    print_reverted(&reverts, args.json)
}

/// The answer of `revert`; the patches are reverted whether or not it can be written.
fn print_reverted(reverts: &engine::Reverts, json: bool) -> Result<()> {
    let (pid, reverted) = (reverts.pid, &reverts.reverted);
    let mut text = String::new();
    if json {
        writeln!(text, "{}", serde_json::to_string_pretty(reverts)?)?;
    } else {
        if reverted.is_empty() {
            writeln!(text, "process {pid}: nothing to revert")?;
        }
        for r in reverted {
            writeln!(text, "process {pid}: patch {} reverted", r.patch)?;
            for n in &r.restored {
                writeln!(text, "  {}: original code", name(n))?;
            }
            for n in &r.stepped_back {
                writeln!(text, "  {}: back to the previous patch", name(n))?;
            }
        }
    }
    output::emit(&text, || {
        let ids: Vec<String> = reverted.iter().map(|r| r.patch.to_string()).collect();
        (!ids.is_empty()).then(|| format!("patch(es) {} WERE reverted in process {pid}", ids.join(", ")))
    })?;
    Ok(())
}
