//! Section 3, call overhead: ns and instructions per call by kind of
//! callee, and a real C code base (SQLite) built with and without padding.

use crate::Config;
use crate::common::{Result, Target, Work, detour_options, field, median, min, num, progress, table};
use hotpatch::engine::{self, FlipMode};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const OVERHEAD_C: &str = include_str!("../c/overhead.c");
const OVERHEAD_PATCH_C: &str = include_str!("../c/overhead_patch.c");
const SQLITE_WORK_C: &str = include_str!("../c/sqlite_work.c");

/// (name in overhead.c, label)
const KINDS: &[(&str, &str)] = &[
    ("inline", "no call (body inlined; loop cost)"),
    ("unprep", "unprepared function"),
    ("prep", "prepared function, not patched"),
    ("patched", "patched function (→ replacement)"),
    (
        "detoured",
        "detoured unprepared function (entry jmp → dispatcher jmp [slot] → replacement)",
    ),
    ("direct", "replacement called directly (through its pointer)"),
    ("unprep_ptr", "unprepared function through a pointer (control)"),
];

#[derive(Debug, Serialize)]
pub struct CallKind {
    pub name: String,
    pub label: String,
    /// Best of the runs, ns per loop iteration (call + `s ^ i` + loop).
    pub ns_per_iteration_min: f64,
    pub ns_per_iteration_median: f64,
    /// Callgrind: instructions per loop iteration (exact).
    pub instructions_per_iteration: Option<f64>,
    /// perf stat instructions:u per iteration, where perf works.
    pub perf_instructions_per_iteration: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct SqliteResult {
    pub source: String,
    pub rows: u64,
    pub runs: usize,
    pub plain_ms: Vec<f64>,
    pub padded_ms: Vec<f64>,
    pub plain_median_ms: f64,
    pub padded_median_ms: f64,
    /// padded / plain, medians.
    pub time_ratio: f64,
    pub callgrind_rows: u64,
    pub plain_instructions: Option<u64>,
    pub padded_instructions: Option<u64>,
    pub instruction_ratio: Option<f64>,
    pub padded_functions: usize,
    pub functions: usize,
}

#[derive(Debug, Serialize)]
pub struct OverheadResult {
    pub calls_per_run: u64,
    pub runs: usize,
    /// The 8 bytes at entry-6 of the patched function after `apply`.
    pub patched_bytes: String,
    /// The 5 bytes at the detoured function's entry after `apply`, and the
    /// 6 where their jump lands (the dispatcher).
    pub detoured_bytes: String,
    pub dispatcher_bytes: String,
    pub kinds: Vec<CallKind>,
    pub perf: String,
    pub sqlite: std::result::Result<SqliteResult, String>,
}

fn build(work: &Work) -> Result<(PathBuf, PathBuf)> {
    work.write("overhead.c", OVERHEAD_C)?;
    work.write("overhead_patch.c", OVERHEAD_PATCH_C)?;
    // -fno-ipa-icf: prep() and patched() are identical and must stay two
    // functions.
    work.gcc(&[
        "-O2",
        "-fno-ipa-icf",
        "-fpatchable-function-entry=8,6",
        "-o",
        "overhead",
        "overhead.c",
        "-ldl",
    ])?;
    let patch = work.patch_library("overhead_patch")?;
    Ok((work.path("overhead"), patch))
}

/// Total `Ir` collected by callgrind in the given run.
fn callgrind(work: &Work, program: &Path, args: &[&str], toggle: &str) -> Result<u64> {
    let out = work.path("callgrind.out");
    let _ = std::fs::remove_file(&out);
    let status = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(format!("--toggle-collect={toggle}"))
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run valgrind: {e}"))?;
    if !status.success() {
        return Err(format!("valgrind {} {args:?}: {status}", program.display()));
    }
    let text = std::fs::read_to_string(&out).map_err(|e| format!("callgrind output: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("totals:").or_else(|| l.strip_prefix("summary:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| "no totals in callgrind's output".into())
}

/// Whether `perf stat -e instructions:u` counts on this machine.
fn perf_works() -> std::result::Result<(), String> {
    let out = Command::new("perf")
        .args(["stat", "-x,", "-e", "instructions:u", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output()
        .map_err(|e| format!("perf not installed ({e})"))?;
    let err = String::from_utf8_lossy(&out.stderr);
    match perf_count(&err) {
        Some(_) if out.status.success() => Ok(()),
        _ => Err(format!(
            "perf cannot count instructions here: {}",
            err.lines().next().unwrap_or("").trim()
        )),
    }
}

fn perf_count(csv: &str) -> Option<u64> {
    csv.lines()
        .find(|l| l.contains("instructions"))
        .and_then(|l| l.split(',').next())
        .and_then(|v| v.trim().parse().ok())
}

fn perf_instructions(program: &Path, args: &[&str]) -> Result<u64> {
    let out = Command::new("perf")
        .args(["stat", "-x,", "-e", "instructions:u", "--"])
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run perf: {e}"))?;
    perf_count(&String::from_utf8_lossy(&out.stderr)).ok_or_else(|| "perf printed no count".into())
}

pub fn run(cfg: &Config, work: &Work) -> Result<OverheadResult> {
    let (program, patch) = build(work)?;
    let patch_arg = patch.display().to_string();
    progress("overhead: timing calls");
    let mut t = Target::start(
        &program,
        &["serve".into(), patch_arg.clone()],
        Duration::from_secs(10),
    )?;
    // The patch replaces patched() (prepared) and detoured() (unprepared,
    // called directly by its loop, declared noipa there).
    let applied = engine::apply(t.pid(), &patch, &detour_options()).map_err(|e| format!("apply: {e}"))?;
    for f in &applied.functions {
        let expected = match f.name.as_str() {
            "detoured" => "detour",
            _ => "prepared",
        };
        if f.route != expected {
            return Err(format!(
                "`{}` went in by route `{}`, not `{expected}`",
                f.name, f.route
            ));
        }
        if f.route == "detour" && !matches!(f.mode, FlipMode::Stopped { .. }) {
            return Err(format!("`{}` was detoured with mode {:?}", f.name, f.mode));
        }
    }
    let bytes = t.command("bytes", Duration::from_secs(5))?;
    let patched_bytes = bytes
        .first()
        .and_then(|l| l.strip_prefix("bytes "))
        .unwrap_or("")
        .to_string();
    if !(patched_bytes.starts_with("ff 25") && patched_bytes.ends_with("eb f8")) {
        return Err(format!(
            "after apply, patched() reads `{patched_bytes}`, not the layout `ff 25 … eb f8` the \
             instruction counts assume"
        ));
    }
    let dbytes = t.command("dbytes", Duration::from_secs(5))?;
    let line = |prefix: &str| {
        dbytes
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or("")
            .to_string()
    };
    let (detoured_bytes, dispatcher_bytes) = (line("dbytes "), line("at "));
    if !(detoured_bytes.starts_with("e9") && dispatcher_bytes.starts_with("ff 25")) {
        return Err(format!(
            "after apply, detoured() reads `{detoured_bytes}` and its jump lands on \
             `{dispatcher_bytes}`, not the layout `e9 …` → `ff 25 …` the instruction counts assume"
        ));
    }
    let n = cfg.calls;
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); KINDS.len()];
    // Interleaved rounds, so drift hits every kind alike.
    for _ in 0..cfg.call_runs {
        for (i, (name, _)) in KINDS.iter().enumerate() {
            let answer = t.command(&format!("time {name} {n}"), Duration::from_secs(120))?;
            samples[i].push(field(&answer, "ns")? as f64 / n as f64);
        }
    }
    drop(t);

    progress("overhead: callgrind");
    let (n1, n2) = (1_000u64, 1_000 + cfg.callgrind_calls);
    let mut kinds = Vec::new();
    let perf = perf_works();
    for (i, (name, label)) in KINDS.iter().enumerate() {
        let toggle = format!("loop_{name}");
        let count = |n: u64| {
            callgrind(
                work,
                &program,
                &["count", name, &n.to_string(), &patch_arg],
                &toggle,
            )
        };
        let ipi = match (count(n1), count(n2)) {
            (Ok(a), Ok(b)) => Some((b as f64 - a as f64) / (n2 - n1) as f64),
            (Err(e), _) | (_, Err(e)) => {
                progress(&format!("callgrind failed: {e}"));
                None
            }
        };
        let perf_ipi = if perf.is_ok() {
            let (p1, p2) = (1_000u64, 1_000 + n);
            let a = perf_instructions(&program, &["count", name, &p1.to_string(), &patch_arg]);
            let b = perf_instructions(&program, &["count", name, &p2.to_string(), &patch_arg]);
            match (a, b) {
                (Ok(a), Ok(b)) => Some((b as f64 - a as f64) / (p2 - p1) as f64),
                _ => None,
            }
        } else {
            None
        };
        kinds.push(CallKind {
            name: name.to_string(),
            label: label.to_string(),
            ns_per_iteration_min: min(&samples[i]),
            ns_per_iteration_median: median(&samples[i]),
            instructions_per_iteration: ipi,
            perf_instructions_per_iteration: perf_ipi,
        });
    }
    let sqlite = if cfg.sqlite {
        sqlite(cfg, work)
    } else {
        Err("skipped (--quick)".into())
    };
    Ok(OverheadResult {
        calls_per_run: n,
        runs: cfg.call_runs,
        patched_bytes,
        detoured_bytes,
        dispatcher_bytes,
        kinds,
        perf: match perf {
            Ok(()) => "perf stat instructions:u".into(),
            Err(e) => e,
        },
        sqlite,
    })
}

fn sqlite_dir() -> Result<PathBuf> {
    let dir = option_env!("HOTPATCH_BENCH_SQLITE_DIR")
        .ok_or("the libsqlite3-sys build did not say where its bundled sources are")?;
    let dir = PathBuf::from(dir);
    if dir.join("sqlite3.c").is_file() {
        Ok(dir)
    } else {
        Err(format!("no sqlite3.c in {}", dir.display()))
    }
}

fn sqlite_run(program: &Path, rows: u64) -> Result<f64> {
    let out = Command::new(program)
        .arg(rows.to_string())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    if !out.status.success() {
        return Err(format!("{} failed: {}", program.display(), out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "ns")
        .nth(1)
        .and_then(|v| v.parse::<f64>().ok())
        .map(|ns| ns / 1e6)
        .ok_or_else(|| format!("unexpected output `{}`", text.trim()))
}

fn sqlite(cfg: &Config, work: &Work) -> Result<SqliteResult> {
    let dir = sqlite_dir()?;
    let source = dir.join("sqlite3.c");
    let source_s = source.display().to_string();
    let include = format!("-I{}", dir.display());
    work.write("sqlite_work.c", SQLITE_WORK_C)?;
    progress("overhead: building SQLite twice (about a minute)");
    let common = ["-O2", "-DSQLITE_OMIT_LOAD_EXTENSION", "-c"];
    let mut plain_args: Vec<&str> = common.to_vec();
    plain_args.extend([source_s.as_str(), "-o", "sqlite_plain.o"]);
    let mut padded_args: Vec<&str> = common.to_vec();
    padded_args.extend([
        "-fpatchable-function-entry=8,6",
        source_s.as_str(),
        "-o",
        "sqlite_padded.o",
    ]);
    let plain = work.gcc_spawn(&plain_args)?;
    let padded = work.gcc_spawn(&padded_args)?;
    plain.wait("gcc sqlite3.c")?;
    padded.wait("gcc -fpatchable-function-entry=8,6 sqlite3.c")?;
    for (obj, exe, extra) in [
        ("sqlite_plain.o", "sqlite_plain", None),
        (
            "sqlite_padded.o",
            "sqlite_padded",
            Some("-fpatchable-function-entry=8,6"),
        ),
    ] {
        let mut args = vec!["-O2", include.as_str()];
        args.extend(extra);
        args.extend(["-o", exe, "sqlite_work.c", obj, "-lm", "-lpthread", "-ldl"]);
        work.gcc(&args)?;
    }
    let plain_exe = work.path("sqlite_plain");
    let padded_exe = work.path("sqlite_padded");
    let image = hotpatch::Image::open(&padded_exe).map_err(|e| e.to_string())?;
    let (padded_functions, functions) = (image.padded_sites().len(), image.functions().len());

    progress("overhead: SQLite workload");
    // Warm-up, then alternate.
    sqlite_run(&plain_exe, cfg.sqlite_rows / 10)?;
    sqlite_run(&padded_exe, cfg.sqlite_rows / 10)?;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..cfg.sqlite_runs {
        a.push(sqlite_run(&plain_exe, cfg.sqlite_rows)?);
        b.push(sqlite_run(&padded_exe, cfg.sqlite_rows)?);
    }
    progress("overhead: SQLite under callgrind");
    let rows_s = cfg.sqlite_callgrind_rows.to_string();
    let plain_i = callgrind(work, &plain_exe, &[&rows_s], "main").ok();
    let padded_i = callgrind(work, &padded_exe, &[&rows_s], "main").ok();
    let (pm, bm) = (median(&a), median(&b));
    Ok(SqliteResult {
        source: source_s,
        rows: cfg.sqlite_rows,
        runs: cfg.sqlite_runs,
        plain_median_ms: pm,
        padded_median_ms: bm,
        time_ratio: bm / pm,
        plain_ms: a,
        padded_ms: b,
        callgrind_rows: cfg.sqlite_callgrind_rows,
        plain_instructions: plain_i,
        padded_instructions: padded_i,
        instruction_ratio: match (plain_i, padded_i) {
            (Some(p), Some(q)) if p > 0 => Some(q as f64 / p as f64),
            _ => None,
        },
        padded_functions,
        functions,
    })
}

pub fn render(r: &OverheadResult) -> String {
    let base = r.kinds.iter().find(|k| k.name == "inline");
    let unprep = r.kinds.iter().find(|k| k.name == "unprep");
    let opt = |v: Option<f64>| v.map_or("-".to_string(), num);
    let rows: Vec<Vec<String>> = r
        .kinds
        .iter()
        .map(|k| {
            vec![
                k.label.clone(),
                num(k.ns_per_iteration_min),
                num(k.ns_per_iteration_median),
                unprep.map_or("-".into(), |u| {
                    format!("{:+.2}", k.ns_per_iteration_min - u.ns_per_iteration_min)
                }),
                opt(k.instructions_per_iteration),
                opt(base
                    .and_then(|b| b.instructions_per_iteration)
                    .zip(k.instructions_per_iteration)
                    .map(|(b, x)| x - b)),
                opt(k.perf_instructions_per_iteration),
            ]
        })
        .collect();
    let mut s = table(
        &format!(
            "Call overhead ({} dependent calls per run, {} runs; ns per loop iteration; instructions from \
             callgrind, exact)",
            r.calls_per_run, r.runs
        ),
        &[
            "callee",
            "ns/iter (best)",
            "ns/iter (median)",
            "ns vs unprepared (best)",
            "instr/iter",
            "instr added by the call",
            "perf instr/iter",
        ],
        &rows,
    );
    s.push_str(&format!(
        "\nPatched entry after `apply` (entry-6 .. entry+2): `{}`. Detoured entry after `apply`: \
         `{}`, landing on the dispatcher `{}`. Callgrind cannot run a ptrace-patched process, so \
         its `patched` and `detoured` runs write these same layouts into themselves (slot in its \
         own .data, dispatcher in its own .text). perf: {}.\n",
        r.patched_bytes, r.detoured_bytes, r.dispatcher_bytes, r.perf
    ));
    match &r.sqlite {
        Ok(q) => {
            s.push_str(&table(
                &format!(
                    "SQLite {} (inserts, point queries, range queries, GROUP BY) built with and without \
                     -fpatchable-function-entry=8,6 (gcc -O2)",
                    q.rows
                ),
                &[
                    "build",
                    "median ms",
                    "min–max ms",
                    &format!("instructions ({} rows, callgrind)", q.callgrind_rows),
                ],
                &[
                    vec![
                        "plain".into(),
                        num(q.plain_median_ms),
                        format!(
                            "{}–{}",
                            num(min(&q.plain_ms)),
                            num(crate::common::max(&q.plain_ms))
                        ),
                        q.plain_instructions.map_or("-".into(), |v| v.to_string()),
                    ],
                    vec![
                        format!(
                            "padded ({} of {} functions prepared)",
                            q.padded_functions, q.functions
                        ),
                        num(q.padded_median_ms),
                        format!(
                            "{}–{}",
                            num(min(&q.padded_ms)),
                            num(crate::common::max(&q.padded_ms))
                        ),
                        q.padded_instructions.map_or("-".into(), |v| v.to_string()),
                    ],
                    vec![
                        "ratio padded / plain".into(),
                        format!("{:.4}", q.time_ratio),
                        "-".into(),
                        q.instruction_ratio.map_or("-".into(), |v| format!("{v:.4}")),
                    ],
                ],
            ));
        }
        Err(e) => s.push_str(&format!("\nSQLite: {e}\n")),
    }
    s
}
