//! Section `scale`: a 1-function apply as the target's threads grow in
//! number (issue 10, "thread choice independent of thread count"), side by
//! side in one run: N threads mostly blocked in `read` against 9 threads,
//! N busy threads against 1 thread, and the stop of every thread that a
//! detour takes at N threads. The target is the stall target (`c/stall.c`)
//! without its timer workers: `BUSY` threads spin calling the patched
//! functions, `BLOCKED` threads wait in `read` on a pipe nobody writes, and
//! its main thread waits in `read` for commands.

use crate::Config;
use crate::common::{
    Result, Target, Work, detour_options, detour_stop_us, max, median, min, ms, num, progress, table,
};
use crate::stall::{self, StallBuild};
use hotpatch::engine::{self, Applied, ApplyOptions, FlipMode, Which};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};

/// Starting N busy threads on 2 cores takes a while: the main thread that
/// creates them gets a 1/N share.
const START: Duration = Duration::from_secs(120);

/// The threads of one target: its main thread (blocked reading commands),
/// `busy` spinning, `blocked` in `read`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Mix {
    pub threads: usize,
    pub busy: usize,
    pub blocked: usize,
}

impl Mix {
    fn new(busy: usize, blocked: usize) -> Mix {
        Mix {
            threads: 1 + busy + blocked,
            busy,
            blocked,
        }
    }

    /// The main thread counts as one in `read`.
    fn label(&self) -> String {
        match self.busy {
            _ if self.threads == 1 => "1 thread".into(),
            0 => format!("{} threads (all in read)", self.threads),
            busy => format!(
                "{} threads ({busy} busy, {} in read)",
                self.threads,
                self.threads - busy
            ),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ScaleRow {
    pub mix: Mix,
    pub label: String,
    pub runs: usize,
    /// Wall time of `engine::apply`, ms: the first apply to a fresh
    /// process (maps the state and call regions), then a second one.
    pub first_apply_ms: Vec<f64>,
    pub warm_apply_ms: Vec<f64>,
    pub warm_revert_ms: Vec<f64>,
    /// Remote calls of the first and the warm apply (last run).
    pub first_remote_calls: u64,
    pub warm_remote_calls: u64,
    /// The detour of the unprepared function: whole apply (ms) and how
    /// long every thread stayed stopped for its write (µs).
    pub detour_apply_ms: Vec<f64>,
    pub detour_stop_us: Vec<f64>,
}

impl ScaleRow {
    fn first(&self) -> f64 {
        median(&self.first_apply_ms)
    }
    fn warm(&self) -> f64 {
        median(&self.warm_apply_ms)
    }
}

/// One ratio of medians, first and warm apply, with the goal.
#[derive(Debug, Serialize)]
pub struct Ratio {
    pub measure: String,
    pub first: f64,
    pub warm: f64,
    pub goal: &'static str,
}

#[derive(Debug, Serialize)]
pub struct ScaleResult {
    pub rows: Vec<ScaleRow>,
    pub ratios: Vec<Ratio>,
}

/// The mixes measured for `n` threads: 1 thread, 9 threads (8 busy), n
/// threads (n − 9 blocked + 8 busy), n busy threads (n − 1 busy + main).
pub fn mixes(n: usize) -> [Mix; 4] {
    [
        Mix::new(0, 0),
        Mix::new(8, 0),
        Mix::new(8, n.saturating_sub(9)),
        Mix::new(n.saturating_sub(1), 0),
    ]
}

pub fn run(cfg: &Config, work: &Work) -> Result<ScaleResult> {
    let b = stall::build(work)?;
    let mut rows = Vec::new();
    for mix in mixes(cfg.scale_threads) {
        let mut row = ScaleRow {
            mix,
            label: mix.label(),
            runs: 0,
            first_apply_ms: Vec::new(),
            warm_apply_ms: Vec::new(),
            warm_revert_ms: Vec::new(),
            first_remote_calls: 0,
            warm_remote_calls: 0,
            detour_apply_ms: Vec::new(),
            detour_stop_us: Vec::new(),
        };
        for run in 0..cfg.scale_runs {
            progress(&format!("scale: {}, run {}", row.label, run + 1));
            one_run(&b, mix, &mut row)?;
            row.runs += 1;
        }
        rows.push(row);
    }
    let [one, nine, many_blocked, many_busy] = &rows[..] else {
        return Err("scale: expected 4 rows".into());
    };
    let ratio = |measure: String, of: &ScaleRow, to: &ScaleRow, goal| Ratio {
        measure,
        first: of.first() / to.first(),
        warm: of.warm() / to.warm(),
        goal,
    };
    let ratios = vec![
        ratio(format!("{} / {}", nine.label, one.label), nine, one, "≤ 2×"),
        ratio(
            format!("{} / {}", many_blocked.label, nine.label),
            many_blocked,
            nine,
            "≤ 1.5×",
        ),
        ratio(
            format!("{} / {}", many_busy.label, one.label),
            many_busy,
            one,
            "≤ 3×",
        ),
    ];
    Ok(ScaleResult { rows, ratios })
}

/// A fresh target: first apply, revert, warm apply, revert, detour, revert;
/// each apply checked to have flipped its one function the expected way.
fn one_run(b: &StallBuild, mix: Mix, row: &mut ScaleRow) -> Result<()> {
    let target = Target::start(
        &b.target,
        &[
            "0".into(),
            mix.busy.to_string(),
            stall::PERIOD_US.to_string(),
            mix.blocked.to_string(),
        ],
        START,
    )?;
    let pid = target.pid();
    // Let the blocked threads reach their read.
    std::thread::sleep(Duration::from_millis(100));
    let prepared = ApplyOptions::default();
    let (first, took) = apply_revert(pid, &b.patch, &prepared, "prepared")?;
    row.first_apply_ms.push(took);
    row.first_remote_calls = first.remote_calls;
    let t0 = Instant::now();
    let (warm, took) = apply_revert(pid, &b.patch, &prepared, "prepared")?;
    row.warm_apply_ms.push(took);
    row.warm_revert_ms.push(ms(t0.elapsed()) - took);
    row.warm_remote_calls = warm.remote_calls;
    let (detour, took) = apply_revert(pid, &b.detour_patch, &detour_options(), "detour")?;
    row.detour_apply_ms.push(took);
    row.detour_stop_us.push(detour_stop_us(&detour)? as f64);
    drop(target);
    Ok(())
}

/// Apply `patch` (one function, by `route`), then revert it; the apply's
/// answer and its wall time in ms.
fn apply_revert(pid: i32, patch: &Path, options: &ApplyOptions, route: &str) -> Result<(Applied, f64)> {
    let t0 = Instant::now();
    let applied = engine::apply(pid, patch, options).map_err(|e| format!("apply ({route}): {e}"))?;
    let took = ms(t0.elapsed());
    match &applied.functions[..] {
        [f] if f.route == route && (route == "detour" || f.mode == FlipMode::Live) => {}
        other => {
            return Err(format!(
                "apply ({route}): expected one function flipped, got {other:?}"
            ));
        }
    }
    let reverted = engine::revert(pid, Which::All).map_err(|e| format!("revert ({route}): {e}"))?;
    if reverted.reverted.iter().map(|r| r.restored.len()).sum::<usize>() != 1 {
        return Err(format!(
            "revert ({route}): expected one function restored, got {reverted:?}"
        ));
    }
    Ok((applied, took))
}

pub fn render(r: &ScaleResult) -> String {
    let range = |v: &[f64]| format!("{}–{}", num(min(v)), num(max(v)));
    let rows: Vec<Vec<String>> = r
        .rows
        .iter()
        .map(|row| {
            vec![
                row.label.clone(),
                row.runs.to_string(),
                num(row.first()),
                range(&row.first_apply_ms),
                num(row.warm()),
                range(&row.warm_apply_ms),
                num(median(&row.warm_revert_ms)),
                format!("{} / {}", row.first_remote_calls, row.warm_remote_calls),
                num(median(&row.detour_apply_ms)),
                num(median(&row.detour_stop_us)),
                range(&row.detour_stop_us),
            ]
        })
        .collect();
    let mut s = table(
        "Scale: a 1-function apply against the target's threads (ms, wall time of `engine::apply`; \
         first = to a fresh process, warm = the second; the stall target without timer workers: busy \
         threads spin calling the patched functions, blocked ones wait in `read`, the main thread \
         waits for commands)",
        &[
            "target threads",
            "runs",
            "first apply median",
            "first apply min–max",
            "warm apply median",
            "warm apply min–max",
            "warm revert median",
            "remote calls first / warm",
            "detour apply median",
            "detour: all threads stopped µs (median)",
            "stopped µs min–max",
        ],
        &rows,
    );
    let ratios: Vec<Vec<String>> = r
        .ratios
        .iter()
        .map(|q| {
            vec![
                q.measure.clone(),
                format!("{}×", num(q.first)),
                format!("{}×", num(q.warm)),
                q.goal.to_string(),
            ]
        })
        .collect();
    s.push_str(&table(
        "Scale ratios (medians of the rows above, side by side from one run)",
        &["apply time, prepared", "first", "warm", "goal (issue 10)"],
        &ratios,
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixes_count_every_thread() {
        let [one, nine, blocked, busy] = mixes(500);
        assert_eq!((one.threads, one.label()), (1, "1 thread".to_string()));
        assert_eq!((nine.threads, nine.busy), (9, 8));
        assert_eq!((blocked.threads, blocked.blocked, blocked.busy), (500, 491, 8));
        assert_eq!(blocked.label(), "500 threads (8 busy, 492 in read)");
        assert_eq!(nine.label(), "9 threads (8 busy, 1 in read)");
        assert_eq!((busy.threads, busy.busy), (500, 499));
    }
}
