//! `hotpatch apply --all PATCH` and `hotpatch revert --everywhere PATCH`:
//! every process of the host, in parallel, one outcome per process.

use crate::audit;
use crate::output;
use anyhow::{Result, bail};
use hotpatch::audit::{Outcome, Record};
use hotpatch::engine::ApplyOptions;
use hotpatch::engine::host::{self, HostOutcome, HostResult, Tally};
use hotpatch::policy::Policy;
use hotpatch::shorten::name;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Threads used unless `--jobs` says: one per CPU.
pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// A progress line on a terminal's stderr, rewritten in place.
fn progress(verb: &'static str) -> impl Fn(&Tally) + Sync {
    let on = std::io::stderr().is_terminal();
    move |t: &Tally| {
        if on {
            eprint!(
                "\r{verb}: {}/{} ({} applied, {} already, {} reverted, {} skipped, {} failed)",
                t.done, t.total, t.applied, t.already, t.reverted, t.skipped, t.failed
            );
            if t.done == t.total {
                eprintln!();
            }
        }
    }
}

#[derive(serde::Serialize)]
struct Run<'a> {
    patch: String,
    sha256: String,
    /// The build-id processes were matched by (apply only).
    build_id: Option<String>,
    processes: &'a [HostOutcome],
    summary: Tally,
    elapsed_us: u64,
}

/// `apply --all`: the patch read and approved once, then applied to every
/// process that maps its target image's build-id.
pub fn apply_all(
    patch: &Path,
    options: &ApplyOptions,
    policy: Result<Policy, hotpatch::policy::PolicyError>,
    jobs: usize,
    json: bool,
) -> Result<()> {
    let started = Instant::now();
    let policy = policy?;
    let approved = policy.read_and_approve(patch)?;
    let exclusions = policy.exclusions()?;
    let (target, build_id) = host::wanted_target(&approved, options)?;
    let candidates = host::find_candidates(&target, &build_id, &exclusions)?;
    let outcomes = host::apply_to_all(&approved, options, candidates, jobs, &progress("applying"));
    let socket = policy.audit_socket().to_path_buf();
    let sha = approved.file().sha256_hex();
    for o in &outcomes {
        let mut record = Record::now("apply", o.process.pid);
        record.patch = Some(patch.display().to_string());
        record.sha256 = Some(sha.clone());
        record.signer = approved.signer().map(str::to_string);
        record.image = o.image.clone();
        record.image_build_id = Some(build_id.clone());
        record.outcome = match &o.result {
            HostResult::Applied { applied } => {
                record.patch_id = Some(applied.patch.id.to_string());
                Outcome::Ok
            }
            HostResult::Failed { error } => Outcome::Failed(error.clone()),
            // Nothing was done: nothing to audit.
            _ => continue,
        };
        audit::log(&socket, &record);
    }
    let run = Run {
        patch: patch.display().to_string(),
        sha256: sha,
        build_id: Some(build_id),
        processes: &outcomes,
        summary: Tally::of(&outcomes),
        elapsed_us: started.elapsed().as_micros() as u64,
    };
    finish(&run, json, "apply")
}

/// `revert --everywhere`: the patch named by its file or its SHA-256,
/// reverted in every process that holds it.
pub fn revert_everywhere(which: &str, policy: Option<&Policy>, jobs: usize, json: bool) -> Result<()> {
    let started = Instant::now();
    let (label, sha) = if which.len() == 64 && which.bytes().all(|b| b.is_ascii_hexdigit()) {
        (which.to_string(), which.to_ascii_lowercase())
    } else {
        let file = hotpatch::policy::trusted_file::read_patch(&PathBuf::from(which))?;
        (which.to_string(), file.sha256_hex())
    };
    let outcomes = host::revert_everywhere(&sha, jobs, &progress("reverting"))?;
    let socket = policy.map_or_else(
        || PathBuf::from(hotpatch::policy::rules::DEFAULT_AUDIT_SOCKET),
        |p| p.audit_socket().to_path_buf(),
    );
    for o in &outcomes {
        let mut record = Record::now("revert", o.process.pid);
        record.sha256 = Some(sha.clone());
        record.patch = Some(label.clone());
        match &o.result {
            HostResult::Reverted { reverted } => {
                for r in reverted {
                    record.patch_id = Some(r.patch.to_string());
                    audit::log(&socket, &record);
                }
            }
            HostResult::Failed { error } => {
                record.outcome = Outcome::Failed(error.clone());
                audit::log(&socket, &record);
            }
            _ => {}
        }
    }
    let run = Run {
        patch: label,
        sha256: sha,
        build_id: None,
        processes: &outcomes,
        summary: Tally::of(&outcomes),
        elapsed_us: started.elapsed().as_micros() as u64,
    };
    finish(&run, json, "revert")
}

/// Print the run; an error (exit 1) if any process failed.
fn finish(run: &Run<'_>, json: bool, verb: &str) -> Result<()> {
    let text = if json {
        format!("{}\n", serde_json::to_string_pretty(run)?)
    } else {
        run_text(run)?
    };
    let t = run.summary;
    output::emit(&text, || {
        (t.applied + t.reverted > 0).then(|| {
            format!(
                "{} process(es) WERE changed ({verb}: {} applied, {} reverted)",
                t.applied + t.reverted,
                t.applied,
                t.reverted
            )
        })
    })?;
    if t.failed > 0 {
        bail!(
            "{verb} failed in {} of {} process(es) (each is named above)",
            t.failed,
            t.total
        );
    }
    Ok(())
}

fn run_text(run: &Run<'_>) -> Result<String> {
    let mut text = String::new();
    for o in run.processes {
        let p = &o.process;
        let who = format!(
            "process {} ({}){}",
            p.pid,
            p.exe.as_deref().map_or_else(|| "?".into(), name),
            p.container_note()
        );
        match &o.result {
            HostResult::Applied { applied } => writeln!(
                text,
                "{who}: patch {} applied to {} ({} function(s), {:.2} ms)",
                applied.patch.id,
                name(&applied.patch.image),
                applied.functions.len(),
                applied.elapsed_us as f64 / 1000.0
            )?,
            HostResult::AlreadyApplied { patch_id } => {
                writeln!(text, "{who}: already applied (patch {patch_id})")?
            }
            HostResult::Reverted { reverted } => {
                let ids: Vec<String> = reverted.iter().map(|r| r.patch.to_string()).collect();
                writeln!(text, "{who}: patch(es) {} reverted", ids.join(", "))?
            }
            HostResult::Skipped { reason } => writeln!(text, "{who}: skipped: {reason}")?,
            HostResult::Failed { error } => writeln!(text, "{who}: FAILED: {error}")?,
        }
    }
    let t = run.summary;
    writeln!(
        text,
        "{} process(es): {} applied, {} already applied, {} reverted, {} skipped, {} failed ({:.1} ms)",
        t.total,
        t.applied,
        t.already,
        t.reverted,
        t.skipped,
        t.failed,
        run.elapsed_us as f64 / 1000.0
    )?;
    Ok(text)
}
