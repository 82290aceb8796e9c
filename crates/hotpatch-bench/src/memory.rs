//! Section 4, memory: what one patch adds to the target (RSS, mappings).

use crate::Config;
use crate::common::{Result, Work, progress, table};
use crate::{apply_time, stall};
use hotpatch::engine::{self, ApplyOptions, Which};
use serde::Serialize;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    pub vm_rss_kib: u64,
    pub vm_size_kib: u64,
    /// smaps_rollup
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub mappings: usize,
    /// Sum of mapping sizes from /proc/PID/maps, KiB.
    pub mapped_kib: u64,
}

fn kib(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

pub fn snapshot(pid: i32) -> Result<Snapshot> {
    let read = |f: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{f}")).map_err(|e| format!("/proc/{pid}/{f}: {e}"))
    };
    let status = read("status")?;
    let rollup = read("smaps_rollup")?;
    let maps = read("maps")?;
    let mut mapped = 0u64;
    let mut count = 0;
    for line in maps.lines() {
        let Some((lo, hi)) = line
            .split_whitespace()
            .next()
            .and_then(|r| r.split_once('-'))
            .and_then(|(a, b)| Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?)))
        else {
            continue;
        };
        count += 1;
        mapped += hi.saturating_sub(lo) / 1024;
    }
    Ok(Snapshot {
        vm_rss_kib: kib(&status, "VmRSS:"),
        vm_size_kib: kib(&status, "VmSize:"),
        rss_kib: kib(&rollup, "Rss:"),
        pss_kib: kib(&rollup, "Pss:"),
        mappings: count,
        mapped_kib: mapped,
    })
}

#[derive(Debug, Serialize)]
pub struct MemoryRow {
    pub case: String,
    pub before: Snapshot,
    pub after_apply: Snapshot,
    pub after_revert: Snapshot,
    /// Mappings present after apply that were not there before.
    pub new_mappings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct MemoryResult {
    pub rows: Vec<MemoryRow>,
}

fn map_names(pid: i32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (lo, hi) = f
                .first()
                .and_then(|r| r.split_once('-'))
                .map_or((0, 0), |(a, b)| {
                    (
                        u64::from_str_radix(a, 16).unwrap_or(0),
                        u64::from_str_radix(b, 16).unwrap_or(0),
                    )
                });
            format!(
                "{} {} KiB {}",
                f.get(1).copied().unwrap_or(""),
                hi.saturating_sub(lo) / 1024,
                f.get(5..).map(|s| s.join(" ")).unwrap_or_default()
            )
        })
        .collect()
}

fn measure(case: &str, pid: i32, patch: &std::path::Path) -> Result<MemoryRow> {
    std::thread::sleep(std::time::Duration::from_millis(100));
    let before = snapshot(pid)?;
    let names_before = map_names(pid);
    let applied = engine::apply(pid, patch, &ApplyOptions::default()).map_err(|e| format!("apply: {e}"))?;
    std::thread::sleep(std::time::Duration::from_millis(100));
    let after_apply = snapshot(pid)?;
    let mut new_mappings: Vec<String> = map_names(pid)
        .into_iter()
        .filter(|m| !names_before.contains(m))
        .collect();
    new_mappings.dedup();
    engine::revert(pid, Which::Patch(applied.patch.id)).map_err(|e| format!("revert: {e}"))?;
    std::thread::sleep(std::time::Duration::from_millis(100));
    let after_revert = snapshot(pid)?;
    Ok(MemoryRow {
        case: case.into(),
        before,
        after_apply,
        after_revert,
        new_mappings,
    })
}

pub fn run(cfg: &Config, work: &Work) -> Result<MemoryResult> {
    progress("memory");
    let mut rows = Vec::new();
    let b = stall::build(work)?;
    let t = stall::start(&b, 16, 0)?;
    rows.push(measure(
        "1 function (stall target, 16 workers)",
        t.pid(),
        &b.patch,
    )?);
    drop(t);
    let k = cfg.memory_functions;
    let m = apply_time::build(work, k)?;
    let t = apply_time::start(&m, 1)?;
    rows.push(measure(&format!("{k} functions (1 thread)"), t.pid(), &m.patch)?);
    drop(t);
    Ok(MemoryResult { rows })
}

pub fn render(r: &MemoryResult) -> String {
    let d = |a: u64, b: u64| format!("{:+}", b as i64 - a as i64);
    let rows: Vec<Vec<String>> = r
        .rows
        .iter()
        .map(|row| {
            let (b, a, v) = (&row.before, &row.after_apply, &row.after_revert);
            vec![
                row.case.clone(),
                format!("{} → {} ({})", b.rss_kib, a.rss_kib, d(b.rss_kib, a.rss_kib)),
                format!("{} → {} ({})", b.pss_kib, a.pss_kib, d(b.pss_kib, a.pss_kib)),
                format!(
                    "{} → {} ({})",
                    b.mappings,
                    a.mappings,
                    d(b.mappings as u64, a.mappings as u64)
                ),
                format!(
                    "{} → {} ({})",
                    b.mapped_kib,
                    a.mapped_kib,
                    d(b.mapped_kib, a.mapped_kib)
                ),
                format!(
                    "{} KiB RSS, {} mappings",
                    d(b.rss_kib, v.rss_kib),
                    d(b.mappings as u64, v.mappings as u64)
                ),
            ]
        })
        .collect();
    let mut s = table(
        "Memory added by one patch (before → after apply; KiB from /proc/PID/smaps_rollup and maps)",
        &[
            "patch",
            "RSS",
            "PSS",
            "mappings",
            "mapped (virtual)",
            "still there after revert",
        ],
        &rows,
    );
    for row in &r.rows {
        s.push_str(&format!("\nNew mappings after apply, {}:\n\n", row.case));
        for m in &row.new_mappings {
            s.push_str(&format!("- `{m}`\n"));
        }
    }
    s
}
