//! `hotpatch doctor PID` and `hotpatch doctor --all`: the preflight checks
//! `apply` runs (`revert` needs a subset), printed for one process or every
//! process.

use anyhow::{Context, Result};
use hotpatch::process::preflight::{self, Depth, Operation, Report, Verdict};
use std::fmt::Write as _;
use std::io::Write as _;

#[derive(clap::Args)]
pub struct Args {
    /// The process to check (its seccomp filters are read: each filtered
    /// thread is stopped for a moment).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pid: Option<i32>,
    /// Every process on the host, one line each: patchable or why not.
    /// Only /proc is read (nothing is stopped), so seccomp filters are
    /// reported, not evaluated.
    #[arg(long)]
    all: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

fn word(v: Verdict) -> &'static str {
    match v {
        Verdict::Ok => "ok",
        Verdict::Unknown => "unknown",
        Verdict::Refuse => "refuse",
    }
}

fn summary(v: Verdict) -> &'static str {
    match v {
        Verdict::Ok => "patchable",
        Verdict::Unknown => "maybe patchable",
        Verdict::Refuse => "not patchable",
    }
}

#[derive(serde::Serialize)]
struct Json<'a> {
    pid: i32,
    name: &'a str,
    verdict: Verdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    findings: Option<&'a [preflight::Finding]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasons: Option<Vec<&'a str>>,
}

pub fn run(args: Args) -> Result<()> {
    let mut text = String::new();
    match (args.pid, args.all) {
        (Some(pid), _) => {
            let report = preflight::inspect(pid, Depth::Full, Operation::Apply)?;
            if args.json {
                let json = Json {
                    pid,
                    name: &report.name,
                    verdict: report.verdict(),
                    findings: Some(&report.findings),
                    reasons: None,
                };
                text = serde_json::to_string_pretty(&json)?;
                text.push('\n');
            } else {
                one(&mut text, &report);
            }
        }
        (None, _) => {
            let reports = all()?;
            if args.json {
                let json: Vec<Json<'_>> = reports
                    .iter()
                    .map(|r| Json {
                        pid: r.pid,
                        name: &r.name,
                        verdict: r.verdict(),
                        findings: None,
                        reasons: Some(not_ok(r)),
                    })
                    .collect();
                text = serde_json::to_string_pretty(&json)?;
                text.push('\n');
            } else {
                for r in &reports {
                    let reasons = not_ok(r);
                    let _ = write!(text, "{:>7}  {:<16} {}", r.pid, r.name, summary(r.verdict()));
                    if !reasons.is_empty() {
                        let _ = write!(text, ": {}", reasons.join("; "));
                    }
                    text.push('\n');
                }
            }
        }
    }
    print(&text)
}

/// The details of the checks that did not pass.
fn not_ok(r: &Report) -> Vec<&str> {
    let worst = r.verdict();
    if worst == Verdict::Ok {
        return Vec::new();
    }
    r.findings
        .iter()
        .filter(|f| f.verdict == worst)
        .map(|f| f.detail.as_str())
        .collect()
}

fn one(text: &mut String, r: &Report) {
    let _ = writeln!(text, "process {} ({}): {}", r.pid, r.name, summary(r.verdict()));
    for f in &r.findings {
        let _ = writeln!(
            text,
            "  {:<8} {:<8} {}",
            f.check.name(),
            word(f.verdict),
            f.detail
        );
    }
}

/// Every process in /proc, looked at passively; processes that exit
/// meanwhile are left out.
fn all() -> Result<Vec<Report>> {
    let mut pids: Vec<i32> = std::fs::read_dir("/proc")
        .context("cannot list /proc")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    Ok(pids
        .into_iter()
        .filter_map(|pid| preflight::inspect(pid, Depth::Passive, Operation::Apply).ok())
        .collect())
}

/// Write to stdout; a reader that went away (a closed pipe) ends the
/// output quietly.
fn print(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing to stdout"),
    }
}
