//! Section 1, stall: how late do periodic worker threads wake while a
//! patch goes in?

use crate::Config;
use crate::common::{
    Result, Target, Work, detour_options, detour_stop_us, field, ms, num, progress, sleep_until, table,
};
use hotpatch::engine::{self, ApplyOptions, Which};
use hotpatch::process::AllStopped;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub const STALL_C: &str = include_str!("../c/stall.c");
pub const STALL_PATCH_C: &str = include_str!("../c/stall_patch.c");
pub const STALL_DETOUR_PATCH_C: &str = include_str!("../c/stall_detour_patch.c");

/// Wake-up period of the workers.
pub const PERIOD_US: u64 = 200;
/// A saturated 2-core machine can keep the target's main thread off a CPU
/// for seconds.
const ANSWER: Duration = Duration::from_secs(60);

/// The stall target and its patches, built.
pub struct StallBuild {
    pub target: PathBuf,
    /// Replaces work(), prepared: a live flip.
    pub patch: PathBuf,
    /// Replaces work_unprep(), built without padding: a detour, written
    /// with every thread stopped.
    pub detour_patch: PathBuf,
}

pub fn build(work: &Work) -> Result<StallBuild> {
    work.write("stall.c", STALL_C)?;
    work.write("stall_patch.c", STALL_PATCH_C)?;
    work.write("stall_detour_patch.c", STALL_DETOUR_PATCH_C)?;
    work.gcc(&[
        "-O2",
        "-g",
        "-fpatchable-function-entry=8,6",
        "-pthread",
        "-o",
        "stall",
        "stall.c",
    ])?;
    let patch = work.patch_library("stall_patch")?;
    let detour_patch = work.patch_library("stall_detour_patch")?;
    Ok(StallBuild {
        target: work.path("stall"),
        patch,
        detour_patch,
    })
}

pub fn start(b: &StallBuild, workers: usize, busy: usize) -> Result<Target> {
    Target::start(
        &b.target,
        &[workers.to_string(), busy.to_string(), PERIOD_US.to_string()],
        Duration::from_secs(20),
    )
}

/// Lateness histogram, merged over windows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Hist {
    /// bucket -> count (buckets as in stall.c's bucket_of).
    #[serde(skip)]
    pub buckets: BTreeMap<u32, u64>,
    pub count: u64,
    pub missed: u64,
    pub max_us: f64,
    pub p999_us: f64,
    pub p99_us: f64,
    pub p50_us: f64,
}

/// The upper edge of a bucket, in µs.
fn bucket_upper_us(b: u32) -> f64 {
    if b < 2048 {
        f64::from(b + 1)
    } else {
        2048.0 + f64::from(b - 2048 + 1) * 64.0
    }
}

impl Hist {
    pub fn parse(lines: &[String]) -> Result<Hist> {
        let mut h = Hist {
            count: field(lines, "count")?,
            missed: field(lines, "missed")?,
            max_us: field(lines, "max_ns")? as f64 / 1e3,
            ..Hist::default()
        };
        let hist = lines
            .iter()
            .find_map(|l| l.strip_prefix("hist"))
            .ok_or("no histogram in the report")?;
        for pair in hist.split_whitespace() {
            let (b, c) = pair
                .split_once(':')
                .and_then(|(b, c)| Some((b.parse::<u32>().ok()?, c.parse::<u64>().ok()?)))
                .ok_or_else(|| format!("bad histogram entry `{pair}`"))?;
            *h.buckets.entry(b).or_default() += c;
        }
        h.finish();
        Ok(h)
    }

    pub fn merge(&mut self, other: &Hist) {
        for (b, c) in &other.buckets {
            *self.buckets.entry(*b).or_default() += c;
        }
        self.count += other.count;
        self.missed += other.missed;
        self.max_us = self.max_us.max(other.max_us);
        self.finish();
    }

    fn percentile(&self, p: f64) -> f64 {
        let total: u64 = self.buckets.values().sum();
        if total == 0 {
            return f64::NAN;
        }
        let want = ((total as f64) * p).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, c) in &self.buckets {
            seen += c;
            if seen >= want {
                return bucket_upper_us(*b).min(self.max_us.max(1.0));
            }
        }
        self.max_us
    }

    fn finish(&mut self) {
        self.p999_us = self.percentile(0.999);
        self.p99_us = self.percentile(0.99);
        self.p50_us = self.percentile(0.5);
    }
}

/// One measured window: lateness, and how long the operation inside took.
pub struct Window<T> {
    pub hist: Hist,
    pub op: Option<(T, Duration)>,
}

/// reset; wait a quarter of `length`; run `op` (if any); wait out the
/// window; report.
pub fn window<T>(
    target: &mut Target,
    length: Duration,
    op: Option<&mut dyn FnMut() -> Result<T>>,
) -> Result<Window<T>> {
    target.command("reset", ANSWER)?;
    let start = Instant::now();
    std::thread::sleep(length / 4);
    let op = match op {
        Some(f) => {
            let t0 = Instant::now();
            let v = f()?;
            Some((v, t0.elapsed()))
        }
        None => None,
    };
    sleep_until(start + length);
    let report = target.command("report", ANSWER)?;
    Ok(Window {
        hist: Hist::parse(&report)?,
        op,
    })
}

#[derive(Debug, Serialize)]
pub struct StallMode {
    pub mode: String,
    /// Lateness over all windows of this mode.
    pub lateness: Option<Hist>,
    /// Worst lateness of each window, µs.
    pub window_max_us: Vec<f64>,
    /// How long the operation took in each window, ms.
    pub op_ms: Vec<f64>,
    /// For an apply that stops every thread: how long they stayed stopped
    /// in each window (the engine's `FlipMode::Stopped`), µs.
    pub stopped_us: Vec<f64>,
    pub note: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct StallRow {
    pub workers: usize,
    pub busy: usize,
    pub window_ms: f64,
    pub windows: usize,
    pub baseline: StallMode,
    pub modes: Vec<StallMode>,
}

#[derive(Debug, Serialize)]
pub struct StallResult {
    pub period_us: u64,
    pub rows: Vec<StallRow>,
    /// Configurations that failed (the others are still reported).
    pub errors: Vec<String>,
}

fn mode(name: &str) -> StallMode {
    StallMode {
        mode: name.into(),
        lateness: Some(Hist::default()),
        window_max_us: Vec::new(),
        op_ms: Vec::new(),
        stopped_us: Vec::new(),
        note: None,
    }
}

fn add<T>(m: &mut StallMode, w: &Window<T>) {
    if let Some(h) = m.lateness.as_mut() {
        h.merge(&w.hist);
    }
    m.window_max_us.push(w.hist.max_us);
    if let Some((_, d)) = &w.op {
        m.op_ms.push(ms(*d));
    }
}

/// The engine's stop path, measured directly: stop every thread, read their
/// `rip`s (as the engine does to check none sits inside the entry), resume.
pub fn stop_and_resume(pid: i32) -> Result<()> {
    let stopped = AllStopped::stop(pid, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    stopped.rips().map_err(|e| e.to_string())?;
    stopped.resume();
    Ok(())
}

/// Keep this thread busy on a CPU for `d`.
pub fn spin(d: Duration) {
    let start = Instant::now();
    let mut x = 0u64;
    while start.elapsed() < d {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}

/// Copy a patch library under a new name in the build directory.
pub fn fresh_copy(work: &Work, from: &std::path::Path, name: &str) -> Result<PathBuf> {
    let to = work.path(name);
    std::fs::copy(from, &to).map_err(|e| format!("cannot copy {}: {e}", from.display()))?;
    Ok(to)
}

pub fn run(cfg: &Config, work: &Work) -> Result<StallResult> {
    let b = build(work)?;
    let mut configs: Vec<(usize, usize)> = cfg.stall_threads.iter().map(|&t| (t, 0)).collect();
    if !cfg.quick {
        configs.push((16, 2));
    }
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for (workers, busy) in configs {
        progress(&format!("stall: {workers} workers, {busy} busy"));
        match one_config(cfg, work, &b, workers, busy) {
            Ok(row) => rows.push(row),
            Err(e) => {
                progress(&format!("stall: {workers} workers, {busy} busy failed: {e}"));
                errors.push(format!("{workers} workers, {busy} busy: {e}"));
            }
        }
    }
    if rows.is_empty() {
        return Err(errors.join("; "));
    }
    Ok(StallResult {
        period_us: PERIOD_US,
        rows,
        errors,
    })
}

fn one_config(cfg: &Config, work: &Work, b: &StallBuild, workers: usize, busy: usize) -> Result<StallRow> {
    {
        let mut target = start(b, workers, busy)?;
        let pid = target.pid();
        // Let the threads settle.
        std::thread::sleep(Duration::from_millis(100));
        let mut baseline = mode("baseline (no patching)");
        let mut live = mode("hotpatch apply (live flip)");
        let mut stop = mode("stop all threads (AllStopped stop + resume)");
        let mut fallback = mode("fallback on unprepared code (detour)");
        let mut control = mode("control: patcher spins on a CPU as long as the apply took, no patching");
        for round in 0..cfg.stall_windows {
            let w: Window<()> = window(&mut target, cfg.stall_window, None)?;
            add(&mut baseline, &w);

            // A fresh copy each time: a new library for dlopen to load, as
            // for a real new patch (revert does not unload a patch).
            let patch = fresh_copy(
                work,
                &b.patch,
                &format!("stall_patch_{workers}_{busy}_{round}.so"),
            )?;
            let mut apply =
                || engine::apply(pid, &patch, &ApplyOptions::default()).map_err(|e| format!("apply: {e}"));
            let w = window(&mut target, cfg.stall_window, Some(&mut apply))?;
            add(&mut live, &w);
            let apply_took = w.op.as_ref().map_or(Duration::ZERO, |(_, d)| *d);
            // Revert outside any window, then let the workers settle.
            engine::revert(pid, Which::All).map_err(|e| format!("revert: {e}"))?;
            std::thread::sleep(Duration::from_millis(50));

            let mut op = || stop_and_resume(pid);
            let w = window(&mut target, cfg.stall_window, Some(&mut op))?;
            add(&mut stop, &w);

            // The fallback: work_unprep() has no padding, so the apply
            // detours it, its entry written with every thread stopped.
            let patch = fresh_copy(
                work,
                &b.detour_patch,
                &format!("stall_detour_patch_{workers}_{busy}_{round}.so"),
            )?;
            let options = detour_options();
            let mut apply =
                || engine::apply(pid, &patch, &options).map_err(|e| format!("apply (detour): {e}"));
            let w = window(&mut target, cfg.stall_window, Some(&mut apply))?;
            if let Some((applied, _)) = &w.op {
                fallback.stopped_us.push(detour_stop_us(applied)? as f64);
            }
            add(&mut fallback, &w);
            engine::revert(pid, Which::All).map_err(|e| format!("revert (detour): {e}"))?;
            std::thread::sleep(Duration::from_millis(50));

            // Control: the patcher only burns a CPU as long as the apply took.
            let mut op = || {
                spin(apply_took);
                Ok(())
            };
            let w = window(&mut target, cfg.stall_window, Some(&mut op))?;
            add(&mut control, &w);
        }
        Ok(StallRow {
            workers,
            busy,
            window_ms: ms(cfg.stall_window),
            windows: cfg.stall_windows,
            baseline,
            modes: vec![live, stop, fallback, control],
        })
    }
}

pub fn render(r: &StallResult) -> String {
    let med = |v: &[f64]| crate::common::median(v);
    let mut rows = Vec::new();
    for row in &r.rows {
        let Some(base) = row.baseline.lateness.as_ref() else {
            continue;
        };
        let base_mw = med(&row.baseline.window_max_us);
        for m in &row.modes {
            let label = if m.stopped_us.is_empty() {
                m.mode.clone()
            } else {
                format!(
                    "{}; all threads stopped {} µs (median)",
                    m.mode,
                    num(med(&m.stopped_us))
                )
            };
            let mut cells = vec![
                row.workers.to_string(),
                row.busy.to_string(),
                label,
                if m.op_ms.is_empty() {
                    "-".into()
                } else {
                    num(med(&m.op_ms))
                },
            ];
            match &m.lateness {
                Some(h) => {
                    let mw = med(&m.window_max_us);
                    cells.extend([
                        format!("{} / {}", num(h.max_us), num(base.max_us)),
                        format!("{} / {}", num(mw), num(base_mw)),
                        format!("{} / {}", num(h.p999_us), num(base.p999_us)),
                        format!(
                            "{} / {} / {}",
                            num(h.max_us - base.max_us),
                            num(mw - base_mw),
                            num(h.p999_us - base.p999_us)
                        ),
                    ])
                }
                None => {
                    let note = m.note.clone().unwrap_or_default();
                    cells.extend([note, "-".into(), "-".into(), "-".into()]);
                }
            }
            rows.push(cells);
        }
    }
    let mut s = table(
        &format!(
            "Stall: worker lateness (µs) in windows containing the operation vs. equal windows without \
             (period {} µs; windows of {} ms × {} per mode)",
            r.period_us,
            r.rows.first().map_or(0.0, |x| x.window_ms),
            r.rows.first().map_or(0, |x| x.windows)
        ),
        &[
            "workers",
            "busy",
            "mode",
            "op ms (median)",
            "worst: op / baseline",
            "median window worst: op / baseline",
            "p99.9: op / baseline",
            "over baseline: worst / median window worst / p99.9",
        ],
        &rows,
    );
    for e in &r.errors {
        s.push_str(&format!("\nFailed: {e}\n"));
    }
    s
}
