//! Section 7, the timeline: every wake of the stall target's workers,
//! with its time, in a window around one operation per method (hotpatch's
//! apply, prepared and detour; a ptrace stop-every-thread write; gdb's
//! attach/write/detach), each on a fresh target. Binned into the worst
//! and median lateness per bin, printed as a table and drawn as one SVG
//! (`--svg-out DIR` writes `DIR/lateness.svg`).

use crate::Config;
use crate::common::{Result, Work, detour_options, ms, num, progress, sleep_until, table};
use crate::side::{FLIP, GDB_HUNG, gdb_version, gdb_write};
use crate::stall::{self, PERIOD_US};
use crate::svg::{self, Panel};
use hotpatch::engine::{self, ApplyOptions};
use hotpatch::process::{AllStopped, Mem};
use serde::Serialize;
use std::time::{Duration, Instant};

/// One wake: its deadline (ms from the operation's start) and lateness (µs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Wake {
    pub deadline_ms: f64,
    pub late_us: f64,
}

/// The wakes of one bin.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bin {
    /// The bin's start, ms from the operation's start.
    pub t_ms: f64,
    pub wakes: usize,
    pub worst_us: f64,
    pub median_us: f64,
}

#[derive(Debug, Serialize)]
pub struct Series {
    pub method: String,
    /// How long the operation took.
    pub op_ms: f64,
    pub wakes: usize,
    /// Worst lateness of wakes due before the operation, during it
    /// (deadline within it), and after it.
    pub worst_before_us: f64,
    pub worst_during_us: f64,
    pub worst_after_us: f64,
    pub bins: Vec<Bin>,
}

#[derive(Debug, Serialize)]
pub struct TimelineResult {
    pub workers: usize,
    pub period_us: u64,
    pub bin_ms: f64,
    pub before_ms: f64,
    pub after_ms: f64,
    pub series: Vec<Series>,
    pub notes: Vec<String>,
}

/// Parse `sample WORKER TIME_NS LATE_NS` lines into wakes relative to
/// `op_start_ns` (CLOCK_MONOTONIC): the deadline is the wake's time less
/// its lateness.
pub fn parse_samples(lines: &[String], op_start_ns: i64) -> Result<Vec<Wake>> {
    let mut out = Vec::with_capacity(lines.len());
    for l in lines {
        let mut f = l.split_whitespace();
        let (Some("sample"), Some(_), Some(t), Some(late), None) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            return Err(format!("not a sample line: `{l}`"));
        };
        let (t, late): (i64, i64) = match (t.parse(), late.parse()) {
            (Ok(t), Ok(late)) => (t, late),
            _ => return Err(format!("not a sample line: `{l}`")),
        };
        out.push(Wake {
            deadline_ms: (t - late - op_start_ns) as f64 / 1e6,
            late_us: late as f64 / 1e3,
        });
    }
    Ok(out)
}

/// Wakes binned by deadline into `bin_ms` bins, sorted by time; empty
/// bins are left out.
pub fn bins(wakes: &[Wake], bin_ms: f64) -> Vec<Bin> {
    let mut by: std::collections::BTreeMap<i64, Vec<f64>> = std::collections::BTreeMap::new();
    for w in wakes {
        if w.deadline_ms.is_finite() && w.late_us.is_finite() {
            by.entry((w.deadline_ms / bin_ms).floor() as i64)
                .or_default()
                .push(w.late_us);
        }
    }
    by.into_iter()
        .map(|(k, mut v)| {
            v.sort_by(f64::total_cmp);
            Bin {
                t_ms: k as f64 * bin_ms,
                wakes: v.len(),
                worst_us: v[v.len() - 1],
                median_us: v[v.len() / 2],
            }
        })
        .collect()
}

/// The worst lateness of the wakes whose deadline is in `range` (ms).
pub fn worst_in(wakes: &[Wake], range: std::ops::Range<f64>) -> f64 {
    wakes
        .iter()
        .filter(|w| range.contains(&w.deadline_ms))
        .map(|w| w.late_us)
        .fold(f64::NAN, f64::max)
}

/// CLOCK_MONOTONIC now, in ns: the clock the target's workers stamp
/// their wakes with.
fn monotonic_ns() -> Result<i64> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_err(|e| format!("clock_gettime: {e}"))?;
    Ok(t.tv_sec() * 1_000_000_000 + t.tv_nsec())
}

fn e(err: impl std::fmt::Display) -> String {
    err.to_string()
}

/// What one method does to a target, and the name it goes by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Prepared,
    Detour,
    StopAll,
    Gdb,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Prepared => "hotpatch apply, prepared (dlopen, then a live flip)",
            Op::Detour => "hotpatch apply, detour (dlopen, then the jump with every thread stopped)",
            Op::StopAll => "ptrace: stop every thread, write 2 bytes, resume",
            Op::Gdb => "gdb -batch -p: attach, write 2 bytes, detach",
        }
    }
}

/// One method on a fresh target: trace, wait `before`, the operation,
/// wait `after`, collect.
fn one(cfg: &Config, work: &Work, b: &stall::StallBuild, op: Op) -> Result<Series> {
    let mut t = stall::start(b, cfg.timeline_workers, 0)?;
    let pid = t.pid();
    let entry = t.ready_address("work")?;
    let alt = t.ready_address("work_alt")?;
    let mem = Mem::open(pid).map_err(e)?;
    let original = mem.read(entry, 2).map_err(e)?;
    // The writes of the ptrace and gdb rows send work() to work_alt through
    // a jump put in its padding beforehand, as the side-by-side section does.
    if matches!(op, Op::StopAll | Op::Gdb) {
        let rel = (alt as i64 - entry as i64) as i32;
        let mut jump = vec![0xe9];
        jump.extend_from_slice(&rel.to_le_bytes());
        let padding = mem.read(entry - 5, 5).map_err(e)?;
        mem.write_expecting(entry - 5, &padding, &jump).map_err(e)?;
    }
    let patch = match op {
        Op::Prepared => Some(stall::fresh_copy(work, &b.patch, "timeline_patch.so")?),
        Op::Detour => Some(stall::fresh_copy(
            work,
            &b.detour_patch,
            "timeline_detour_patch.so",
        )?),
        _ => None,
    };
    // Let the new process settle (page faults, thread start-up).
    std::thread::sleep(Duration::from_millis(100));
    t.command("trace", Duration::from_secs(10))?;
    std::thread::sleep(cfg.timeline_before);
    let start_ns = monotonic_ns()?;
    let started = Instant::now();
    match (op, &patch) {
        (Op::Prepared, Some(p)) => {
            engine::apply(pid, p, &ApplyOptions::default()).map_err(|err| format!("apply: {err}"))?;
        }
        (Op::Detour, Some(p)) => {
            engine::apply(pid, p, &detour_options()).map_err(|err| format!("apply: {err}"))?;
        }
        (Op::StopAll, _) => {
            let stopped = AllStopped::stop(pid, Duration::from_secs(10)).map_err(e)?;
            mem.write_expecting(entry, &original, &FLIP).map_err(e)?;
            stopped.resume();
        }
        (Op::Gdb, _) => gdb_write(pid, entry)?,
        _ => return Err("no patch for an apply".into()),
    }
    let took = started.elapsed();
    sleep_until(Instant::now() + cfg.timeline_after);
    let lines = t.command("samples", Duration::from_secs(60))?;
    if matches!(op, Op::StopAll | Op::Gdb) && mem.read(entry, 2).map_err(e)? != FLIP {
        return Err(format!("{}: the entry was not written", op.name()));
    }
    let wakes = parse_samples(&lines, start_ns)?;
    let op_ms = ms(took);
    Ok(Series {
        method: op.name().into(),
        op_ms,
        wakes: wakes.len(),
        worst_before_us: worst_in(&wakes, f64::NEG_INFINITY..0.0),
        worst_during_us: worst_in(&wakes, 0.0..op_ms),
        worst_after_us: worst_in(&wakes, op_ms..f64::INFINITY),
        bins: bins(&wakes, cfg.timeline_bin_ms),
    })
}

pub fn run(cfg: &Config, work: &Work) -> Result<TimelineResult> {
    let b = stall::build(work)?;
    let mut ops = vec![Op::Prepared, Op::Detour, Op::StopAll];
    let mut notes = Vec::new();
    match gdb_version() {
        Some(v) => {
            ops.push(Op::Gdb);
            notes.push(v);
        }
        None => notes.push("gdb not installed: its row is skipped".into()),
    }
    let mut series = Vec::new();
    for op in ops {
        progress(&format!("timeline: {}", op.name()));
        match one(cfg, work, &b, op) {
            Ok(s) => series.push(s),
            // A third party's hang is reported, not fatal (as side by side).
            Err(err) if op == Op::Gdb && err.contains(GDB_HUNG) => {
                progress(&format!("timeline: {err}; gdb's row is left out"));
                notes.push(format!("gdb: {err}"));
            }
            Err(err) => return Err(err),
        }
    }
    Ok(TimelineResult {
        workers: cfg.timeline_workers,
        period_us: PERIOD_US,
        bin_ms: cfg.timeline_bin_ms,
        before_ms: ms(cfg.timeline_before),
        after_ms: ms(cfg.timeline_after),
        series,
        notes,
    })
}

/// The chart of a result.
pub fn chart(r: &TimelineResult, commit: &str) -> String {
    let panels: Vec<Panel> = r
        .series
        .iter()
        .map(|s| Panel {
            title: format!("{} — {} ms", s.method, num(s.op_ms)),
            op_end_ms: s.op_ms,
            worst: s.bins.iter().map(|b| (b.t_ms, b.worst_us)).collect(),
            median: s.bins.iter().map(|b| (b.t_ms, b.median_us)).collect(),
            x_range: (-r.before_ms, s.op_ms + r.after_ms),
            gap_ms: 2.5 * r.bin_ms,
        })
        .collect();
    svg::lateness_chart(
        "How late the target's threads wake around one operation",
        &format!(
            "stall target: {} workers waking every {} µs, a fresh process per method; bins of {} ms by each wake's deadline\n\
             (a gap: no wake had its deadline there, the threads were stopped or late past it); hotpatch-bench, commit {commit}",
            r.workers, r.period_us, r.bin_ms
        ),
        &panels,
    )
}

pub fn render(r: &TimelineResult) -> String {
    let rows: Vec<Vec<String>> = r
        .series
        .iter()
        .map(|s| {
            vec![
                s.method.clone(),
                num(s.op_ms),
                s.wakes.to_string(),
                num(s.worst_before_us),
                num(s.worst_during_us),
                num(s.worst_after_us),
            ]
        })
        .collect();
    let mut out = table(
        &format!(
            "Timeline: worker lateness (µs) around one operation, {} workers every {} µs, {} ms before and {} ms after (`--svg-out DIR` draws it)",
            r.workers,
            r.period_us,
            num(r.before_ms),
            num(r.after_ms)
        ),
        &[
            "method",
            "op ms",
            "wakes",
            "worst, due before",
            "worst, due during",
            "worst, due after",
        ],
        &rows,
    );
    for n in &r.notes {
        out.push_str(&format!("\nNote: {n}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_become_wakes_at_their_deadlines() {
        let lines = vec![
            "sample 0 1000000000 50000".to_string(),
            "sample 3 1002000000 2000000".to_string(),
        ];
        let w = parse_samples(&lines, 999_000_000).unwrap();
        assert_eq!(
            w,
            vec![
                Wake {
                    deadline_ms: 0.95,
                    late_us: 50.0
                },
                Wake {
                    deadline_ms: 1.0,
                    late_us: 2000.0
                }
            ]
        );
        assert!(parse_samples(&["sample 0 x 1".to_string()], 0).is_err());
        assert!(parse_samples(&["count 3".to_string()], 0).is_err());
    }

    #[test]
    fn bins_hold_worst_and_median() {
        let w = |d, l| Wake {
            deadline_ms: d,
            late_us: l,
        };
        let b = bins(
            &[
                w(-0.5, 10.0),
                w(0.1, 5.0),
                w(0.2, 7.0),
                w(0.9, 100.0),
                w(2.5, 1.0),
            ],
            1.0,
        );
        assert_eq!(
            b.iter()
                .map(|b| (b.t_ms, b.wakes, b.worst_us, b.median_us))
                .collect::<Vec<_>>(),
            vec![(-1.0, 1, 10.0, 10.0), (0.0, 3, 100.0, 7.0), (2.0, 1, 1.0, 1.0)]
        );
        assert_eq!(worst_in(&[w(0.1, 5.0), w(3.0, 9.0)], 0.0..1.0), 5.0);
        assert!(worst_in(&[], 0.0..1.0).is_nan());
    }
}
