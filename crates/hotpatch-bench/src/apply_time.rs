//! Section 2, apply and revert time: versus the number of functions in one
//! patch and the number of threads in the target.

use crate::Config;
use crate::common::{
    Result, Target, Work, detour_options, detour_stop_us, field, max, median, min, ms, num, progress, table,
};
use hotpatch::engine::{self, ApplyOptions, FlipMode, Which};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const ANSWER: Duration = Duration::from_secs(30);

/// How the functions of a target are patched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Route {
    /// Built with `-fpatchable-function-entry=8,6`: flipped live.
    Prepared,
    /// Built without: detoured, the entries written in one stop of every
    /// thread.
    Detour,
}

impl Route {
    pub fn name(self) -> &'static str {
        match self {
            Route::Prepared => "prepared",
            Route::Detour => "detour",
        }
    }
}

/// The body of `f_i` (`i` its index): `x + i` for prepared functions; for
/// unprepared ones, code long enough for a 5-byte jump over whole
/// instructions (`x + i` alone is 4 or 5 bytes with its `ret`): several
/// instructions in the first 5 bytes, as in a usual prologue.
fn body(route: Route, i: usize, plus: usize) -> String {
    match route {
        Route::Prepared => format!("x + {i} + {plus}"),
        Route::Detour => format!("(x ^ (x >> 7)) + {i} + {plus}"),
    }
}

/// A target with `k` functions `f_i(x) = x + i` (prepared; or, for
/// [`Route::Detour`], unprepared with `f_i(0) = i`) and threads that wake
/// every millisecond to call one of them. Commands: `check` answers
/// `sum S` with S = Σ f_i(0); `quit`.
pub fn target_source(k: usize, route: Route) -> String {
    let mut s = String::from(
        "#define _GNU_SOURCE\n#include <pthread.h>\n#include <stdio.h>\n#include <stdlib.h>\n\
         #include <string.h>\n#include <time.h>\n\n",
    );
    // Unprepared functions are `noipa`: a caller that gcc turns into a
    // direct call (the `check` loop, for small K) assumes the full ABI
    // clobber set, so a replacement built elsewhere is safe to call.
    let attributes = match route {
        Route::Prepared => "noinline",
        Route::Detour => "noipa, patchable_function_entry(0, 0)",
    };
    for i in 0..k {
        let _ = writeln!(
            s,
            "__attribute__(({attributes})) long f_{i}(long x) {{ return {}; }}",
            body(route, i, 0)
        );
    }
    s.push_str("\nstatic long (*const table[])(long) = {\n");
    for i in 0..k {
        let _ = writeln!(s, "    f_{i},");
    }
    let _ = write!(
        s,
        r#"}};
#define K {k}
static volatile long sink;
static int started;

static void *thread_main(void *arg)
{{
    unsigned long i = (unsigned long)arg;
    __atomic_add_fetch(&started, 1, __ATOMIC_RELEASE);
    for (;;) {{
        struct timespec ms = {{0, 1000000}};
        nanosleep(&ms, NULL);
        sink += table[i++ % K](1);
    }}
    return NULL;
}}

int main(int argc, char **argv)
{{
    int n = argc > 1 ? atoi(argv[1]) : 1;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    for (int i = 0; i < n; i++) {{
        pthread_t t;
        if (pthread_create(&t, &attr, thread_main, (void *)(unsigned long)i))
            return 1;
    }}
    while (__atomic_load_n(&started, __ATOMIC_ACQUIRE) < n) {{
        struct timespec ms = {{0, 1000000}};
        nanosleep(&ms, NULL);
    }}
    printf("ready\n");
    fflush(stdout);
    char line[256];
    while (fgets(line, sizeof line, stdin)) {{
        if (!strncmp(line, "check", 5)) {{
            long s = 0;
            for (int i = 0; i < K; i++)
                s += table[i](0);
            printf("sum %ld\n", s);
        }} else if (!strncmp(line, "quit", 4)) {{
            return 0;
        }} else {{
            printf("error unknown command\n");
        }}
        printf("end\n");
        fflush(stdout);
    }}
    return 0;
}}
"#
    );
    s
}

/// The patch: `g_i(x) = f_i(x) + 1` replaces every `f_i`.
pub fn patch_source(k: usize, image: &str, route: Route) -> String {
    let mut s = format!("#include \"hotpatch.h\"\n\nHOTPATCH_TARGET(\"{image}\", \"\");\n\n");
    for i in 0..k {
        let _ = writeln!(s, "long g_{i}(long x) {{ return {}; }}", body(route, i, 1));
        let _ = writeln!(s, "HOTPATCH_REPLACE(f_{i}, g_{i});");
    }
    s
}

pub struct ManyBuild {
    pub k: usize,
    pub route: Route,
    pub target: PathBuf,
    pub patch: PathBuf,
}

/// `k` prepared functions.
pub fn build(work: &Work, k: usize) -> Result<ManyBuild> {
    build_route(work, k, Route::Prepared)
}

/// `k` functions patched by `route`: the detour target is the same program
/// built without `-fpatchable-function-entry` (and each function says so
/// too, with the attribute).
pub fn build_route(work: &Work, k: usize, route: Route) -> Result<ManyBuild> {
    let (name, padding) = match route {
        Route::Prepared => (format!("many{k}"), Some("-fpatchable-function-entry=8,6")),
        Route::Detour => (format!("many{k}_unprepared"), None),
    };
    work.write(&format!("{name}.c"), &target_source(k, route))?;
    work.write(&format!("{name}_patch.c"), &patch_source(k, &name, route))?;
    let source = format!("{name}.c");
    let mut args = vec!["-O2"];
    args.extend(padding);
    args.extend(["-pthread", "-o", &name, &source]);
    work.gcc(&args)?;
    let patch = work.patch_library(&format!("{name}_patch"))?;
    Ok(ManyBuild {
        k,
        route,
        target: work.path(&name),
        patch,
    })
}

pub fn start(b: &ManyBuild, threads: usize) -> Result<Target> {
    Target::start(&b.target, &[threads.to_string()], Duration::from_secs(30))
}

fn sum(t: &mut Target) -> Result<i64> {
    Ok(field(&t.command("check", ANSWER)?, "sum")? as i64)
}

#[derive(Debug, Serialize)]
pub struct ApplyRow {
    pub functions: usize,
    pub threads: usize,
    pub route: Route,
    pub runs: usize,
    pub apply_ms: Vec<f64>,
    pub revert_ms: Vec<f64>,
    pub apply_median_ms: f64,
    pub revert_median_ms: f64,
    /// A second apply / revert on the same process: the call region is
    /// reused, membarrier is registered, the functions' routes are revived.
    pub warm_apply_ms: Vec<f64>,
    pub warm_apply_median_ms: f64,
    pub warm_revert_median_ms: f64,
    /// The engine's own figure (`Applied::elapsed_us`), median, ms.
    pub engine_elapsed_median_ms: f64,
    /// How the functions went live (counts of live / stopped / superseded).
    pub live: usize,
    pub stopped: usize,
    /// Detours: how long every thread stayed stopped for the entry writes
    /// of the first apply (one stop for all functions), median, µs.
    pub stopped_us_median: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct ApplyResult {
    pub rows: Vec<ApplyRow>,
    pub notes: Vec<String>,
}

/// Times of one run.
struct RunTimes {
    apply: Duration,
    revert: Duration,
    engine_us: u64,
    warm_apply: Duration,
    warm_revert: Duration,
    live: usize,
    stopped: usize,
    stopped_us: Option<u64>,
}

/// One run on a fresh target: apply and revert (checked), then the same
/// again on the same process (warm).
fn one_run(b: &ManyBuild, threads: usize) -> Result<RunTimes> {
    let mut t = start(b, threads)?;
    let first = apply_revert(b, &mut t)?;
    let warm = apply_revert(b, &mut t)?;
    Ok(RunTimes {
        apply: first.apply,
        revert: first.revert,
        engine_us: first.engine_us,
        warm_apply: warm.apply,
        warm_revert: warm.revert,
        live: first.live,
        stopped: first.stopped,
        stopped_us: first.stopped_us,
    })
}

/// One apply and its revert.
struct Cycle {
    apply: Duration,
    revert: Duration,
    engine_us: u64,
    live: usize,
    stopped: usize,
    stopped_us: Option<u64>,
}

fn apply_revert(b: &ManyBuild, t: &mut Target) -> Result<Cycle> {
    let pid = t.pid();
    let before = sum(t)?;
    let options = match b.route {
        Route::Prepared => ApplyOptions::default(),
        Route::Detour => detour_options(),
    };
    let t0 = Instant::now();
    let applied = engine::apply(pid, &b.patch, &options).map_err(|e| format!("apply: {e}"))?;
    let apply = t0.elapsed();
    let after = sum(t)?;
    if after != before + b.k as i64 {
        return Err(format!(
            "after apply Σf_i(0) = {after}, expected {} (patch not in effect)",
            before + b.k as i64
        ));
    }
    let live = applied
        .functions
        .iter()
        .filter(|f| f.mode == FlipMode::Live)
        .count();
    let stopped = applied
        .functions
        .iter()
        .filter(|f| matches!(f.mode, FlipMode::Stopped { .. }))
        .count();
    let stopped_us = match b.route {
        Route::Prepared => None,
        Route::Detour => Some(detour_stop_us(&applied)?),
    };
    let t0 = Instant::now();
    engine::revert(pid, Which::Patch(applied.patch.id)).map_err(|e| format!("revert: {e}"))?;
    let revert = t0.elapsed();
    let back = sum(t)?;
    if back != before {
        return Err(format!("after revert Σf_i(0) = {back}, expected {before}"));
    }
    Ok(Cycle {
        apply,
        revert,
        engine_us: applied.elapsed_us,
        live,
        stopped,
        stopped_us,
    })
}

fn measure(b: &ManyBuild, threads: usize, runs: usize) -> Result<ApplyRow> {
    let mut apply = Vec::new();
    let mut revert = Vec::new();
    let mut engine_ms = Vec::new();
    let mut warm_apply = Vec::new();
    let mut warm_revert = Vec::new();
    let (mut live, mut stopped) = (0, 0);
    let mut stopped_us = Vec::new();
    for _ in 0..runs {
        let r = one_run(b, threads)?;
        apply.push(ms(r.apply));
        revert.push(ms(r.revert));
        engine_ms.push(r.engine_us as f64 / 1e3);
        warm_apply.push(ms(r.warm_apply));
        warm_revert.push(ms(r.warm_revert));
        live = r.live;
        stopped = r.stopped;
        stopped_us.extend(r.stopped_us.map(|us| us as f64));
    }
    Ok(ApplyRow {
        functions: b.k,
        threads,
        route: b.route,
        runs,
        apply_median_ms: median(&apply),
        revert_median_ms: median(&revert),
        engine_elapsed_median_ms: median(&engine_ms),
        warm_apply_median_ms: median(&warm_apply),
        warm_revert_median_ms: median(&warm_revert),
        warm_apply_ms: warm_apply,
        apply_ms: apply,
        revert_ms: revert,
        live,
        stopped,
        stopped_us_median: (!stopped_us.is_empty()).then(|| median(&stopped_us)),
    })
}

pub fn run(cfg: &Config, work: &Work) -> Result<ApplyResult> {
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for &k in &cfg.apply_functions {
        progress(&format!("apply: building {k} functions"));
        let builds = cfg
            .apply_routes
            .iter()
            .map(|&route| build_route(work, k, route))
            .collect::<Result<Vec<_>>>()?;
        for &threads in &cfg.apply_threads {
            for b in &builds {
                progress(&format!(
                    "apply: {k} functions, {threads} threads, {}",
                    b.route.name()
                ));
                rows.push(measure(b, threads, cfg.apply_runs)?);
            }
        }
    }
    if let Some(big) = cfg.apply_big {
        // Only if the largest size measured so far says it fits the time box.
        let largest = rows
            .iter()
            .filter(|r| r.threads == 1 && r.route == Route::Prepared)
            .max_by_key(|r| r.functions)
            .map(|r| (r.functions, r.apply_median_ms + r.revert_median_ms));
        let runs = cfg.apply_big_runs;
        let predicted_s = largest.map_or(f64::INFINITY, |(k, t)| {
            t * (big as f64 / k as f64) * runs as f64 / 1e3
        });
        if predicted_s <= cfg.apply_big_budget.as_secs_f64() {
            progress(&format!("apply: building {big} functions"));
            let b = build(work, big)?;
            progress(&format!("apply: {big} functions, 1 thread"));
            rows.push(measure(&b, 1, runs)?);
            notes.push(format!("{big} functions: prepared only"));
        } else {
            notes.push(format!(
                "{big} functions skipped: predicted {predicted_s:.0} s from the largest size measured, over \
                 the budget of {} s",
                cfg.apply_big_budget.as_secs()
            ));
        }
    }
    Ok(ApplyResult { rows, notes })
}

pub fn render(r: &ApplyResult) -> String {
    let rows: Vec<Vec<String>> = r
        .rows
        .iter()
        .map(|row| {
            vec![
                row.functions.to_string(),
                row.threads.to_string(),
                row.route.name().to_string(),
                row.runs.to_string(),
                num(row.apply_median_ms),
                format!("{}–{}", num(min(&row.apply_ms)), num(max(&row.apply_ms))),
                num(row.engine_elapsed_median_ms),
                num(row.revert_median_ms),
                format!("{}–{}", num(min(&row.revert_ms)), num(max(&row.revert_ms))),
                num(row.warm_apply_median_ms),
                format!(
                    "{}–{}",
                    num(min(&row.warm_apply_ms)),
                    num(max(&row.warm_apply_ms))
                ),
                num(row.warm_revert_median_ms),
                match row.stopped_us_median {
                    Some(us) if row.live == 0 => {
                        format!("{} stopped (one stop, {} µs)", row.stopped, num(us))
                    }
                    _ => format!("{} live / {} stopped", row.live, row.stopped),
                },
            ]
        })
        .collect();
    let mut s = table(
        "Apply and revert time (ms; library calls `engine::apply` / `engine::revert`; first = the first \
         apply to a fresh process, which maps the state and call regions and registers membarrier; \
         warm = a second apply / revert on the same process; route: prepared = built with padding, \
         flipped live; detour = built without, a jump written at each entry in one stop of every thread)",
        &[
            "functions",
            "threads",
            "route",
            "runs",
            "first apply median",
            "first apply min–max",
            "engine elapsed_us median",
            "revert median",
            "revert min–max",
            "warm apply median",
            "warm apply min–max",
            "warm revert median",
            "flips",
        ],
        &rows,
    );
    for n in &r.notes {
        s.push_str(&format!("\nNote: {n}\n"));
    }
    s
}
