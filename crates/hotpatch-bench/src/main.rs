//! `hotpatch-bench`: the figures behind BENCHMARKS.md, measured in one run
//! on this machine and printed as markdown tables (and JSON with
//! `--json-out FILE`). Figures are reported, never asserted.
//!
//! ```text
//! cargo run --release -p hotpatch-bench                 # full run, under 10 minutes on 2 cores
//! cargo run --release -p hotpatch-bench -- --quick      # CI smoke, tiny sizes
//! cargo run --release -p hotpatch-bench -- --only stall,apply --json-out bench.json
//! cargo run --release -p hotpatch-bench -- --only timeline --svg-out docs   # docs/lateness.svg
//! ```
//!
//! Sections: `stall`, `apply`, `scale`, `overhead`, `memory`, `side`, `timeline`. Each builds its
//! C subjects with gcc in a temporary directory; every process it starts is
//! killed and reaped when the section ends, on every path.

mod apply_time;
mod common;
mod memory;
mod overhead;
mod scale;
mod side;
mod stall;
mod svg;
mod timeline;

use common::{Result, Work, progress};
use serde::Serialize;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// Sizes and repetitions; `--quick` shrinks them.
pub struct Config {
    pub quick: bool,
    pub stall_threads: Vec<usize>,
    pub stall_window: Duration,
    pub stall_windows: usize,
    pub apply_functions: Vec<usize>,
    pub apply_threads: Vec<usize>,
    pub apply_runs: usize,
    /// Which routes the `apply` section measures.
    pub apply_routes: Vec<apply_time::Route>,
    /// The largest size, run only if it fits `apply_big_budget`.
    pub apply_big: Option<usize>,
    pub apply_big_runs: usize,
    pub apply_big_budget: Duration,
    /// The thread count of the `scale` section's large targets.
    pub scale_threads: usize,
    pub scale_runs: usize,
    pub calls: u64,
    pub call_runs: usize,
    pub callgrind_calls: u64,
    pub sqlite: bool,
    pub sqlite_rows: u64,
    pub sqlite_runs: usize,
    pub sqlite_callgrind_rows: u64,
    pub memory_functions: usize,
    pub side_threads: Vec<usize>,
    pub side_window: Duration,
    pub side_windows: usize,
    /// The timeline: workers of its stall target, the window before and
    /// after each operation, the bins of the chart.
    pub timeline_workers: usize,
    pub timeline_before: Duration,
    pub timeline_after: Duration,
    pub timeline_bin_ms: f64,
}

impl Config {
    fn full() -> Config {
        Config {
            quick: false,
            stall_threads: vec![1, 16, 128],
            stall_window: Duration::from_millis(1000),
            stall_windows: 5,
            apply_functions: vec![1, 10, 100, 1000],
            apply_threads: vec![1, 16, 128],
            apply_runs: 5,
            apply_routes: vec![apply_time::Route::Prepared, apply_time::Route::Detour],
            apply_big: Some(10_000),
            apply_big_runs: 1,
            apply_big_budget: Duration::from_secs(120),
            scale_threads: 500,
            scale_runs: 5,
            calls: 100_000_000,
            call_runs: 7,
            callgrind_calls: 100_000,
            sqlite: true,
            sqlite_rows: 100_000,
            sqlite_runs: 9,
            sqlite_callgrind_rows: 5_000,
            memory_functions: 1000,
            side_threads: vec![16, 128],
            side_window: Duration::from_millis(2000),
            side_windows: 2,
            timeline_workers: 16,
            timeline_before: Duration::from_millis(100),
            timeline_after: Duration::from_millis(150),
            timeline_bin_ms: 1.0,
        }
    }

    fn quick() -> Config {
        Config {
            quick: true,
            stall_threads: vec![1, 16],
            stall_window: Duration::from_millis(200),
            stall_windows: 1,
            apply_functions: vec![1, 10],
            apply_threads: vec![1],
            apply_runs: 1,
            apply_routes: vec![apply_time::Route::Prepared, apply_time::Route::Detour],
            apply_big: None,
            apply_big_runs: 0,
            apply_big_budget: Duration::ZERO,
            scale_threads: 100,
            scale_runs: 1,
            calls: 1_000_000,
            call_runs: 1,
            callgrind_calls: 1_000,
            sqlite: false,
            sqlite_rows: 0,
            sqlite_runs: 0,
            sqlite_callgrind_rows: 0,
            memory_functions: 10,
            side_threads: vec![16],
            side_window: Duration::from_millis(1500),
            side_windows: 1,
            timeline_workers: 4,
            timeline_before: Duration::from_millis(30),
            timeline_after: Duration::from_millis(50),
            timeline_bin_ms: 1.0,
        }
    }
}

const SECTIONS: &[&str] = &[
    "stall", "apply", "scale", "overhead", "memory", "side", "timeline",
];

const USAGE: &str = "usage: hotpatch-bench [--quick] [--json-out FILE] [--svg-out DIR] [--only SECTION,...]
                      [--apply-functions N,...] [--apply-threads N,...] [--apply-runs N]
                      [--apply-route prepared|detour]
  sections: stall, apply, scale, overhead, memory, side, timeline (default: all)
  --svg-out DIR: the timeline's chart, DIR/lateness.svg
  --apply-functions/--apply-threads/--apply-runs/--apply-route: only these rows of
    `apply` (e.g. `--only apply --apply-functions 1000 --apply-threads 1 --apply-route prepared`)
  Prints markdown tables on stdout (progress on stderr); figures are never asserted.";

struct Args {
    quick: bool,
    json_out: Option<PathBuf>,
    svg_out: Option<PathBuf>,
    only: Vec<String>,
    apply_functions: Option<Vec<usize>>,
    apply_threads: Option<Vec<usize>>,
    apply_runs: Option<usize>,
    apply_route: Option<apply_time::Route>,
}

/// A comma-separated list of positive counts.
fn counts(flag: &str, list: Option<String>) -> std::result::Result<Vec<usize>, String> {
    let list = list.ok_or(format!("{flag} needs a list of numbers"))?;
    list.split(',')
        .map(|n| match n.trim().parse::<usize>() {
            Ok(v) if v > 0 => Ok(v),
            _ => Err(format!("{flag}: `{n}` is not a positive number")),
        })
        .collect()
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut args = Args {
        quick: false,
        json_out: None,
        svg_out: None,
        only: SECTIONS.iter().map(|s| s.to_string()).collect(),
        apply_functions: None,
        apply_threads: None,
        apply_runs: None,
        apply_route: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => args.quick = true,
            "--json-out" => args.json_out = Some(it.next().ok_or("--json-out needs a file")?.into()),
            "--svg-out" => args.svg_out = Some(it.next().ok_or("--svg-out needs a directory")?.into()),
            "--only" => {
                let list = it.next().ok_or("--only needs a list of sections")?;
                args.only = list.split(',').map(str::to_string).collect();
                if let Some(bad) = args.only.iter().find(|s| !SECTIONS.contains(&s.as_str())) {
                    return Err(format!("unknown section `{bad}`"));
                }
            }
            "--apply-functions" => args.apply_functions = Some(counts(&a, it.next())?),
            "--apply-threads" => args.apply_threads = Some(counts(&a, it.next())?),
            "--apply-runs" => {
                let runs = counts(&a, it.next())?;
                match runs.as_slice() {
                    [n] => args.apply_runs = Some(*n),
                    _ => return Err("--apply-runs needs one number".into()),
                }
            }
            "--apply-route" => {
                args.apply_route = Some(match it.next().as_deref() {
                    Some("prepared") => apply_time::Route::Prepared,
                    Some("detour") => apply_time::Route::Detour,
                    _ => return Err("--apply-route needs `prepared` or `detour`".into()),
                })
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(args)
}

#[derive(Serialize)]
struct Machine {
    cpu: String,
    cpus: usize,
    cpu_flags_of_note: Vec<String>,
    kernel: String,
    os: String,
    gcc: String,
    valgrind: String,
    commit: String,
    /// /proc/loadavg at the start and at the end of the run: other work on
    /// the machine shows here.
    loadavg_start: String,
    loadavg_end: String,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| format!("{program}: not found"))
}

/// The commit measured: HOTPATCH_BENCH_COMMIT if set (sources that are not
/// a git checkout, e.g. an export of a commit), else git's HEAD.
fn commit() -> String {
    if let Ok(c) = std::env::var("HOTPATCH_BENCH_COMMIT") {
        return c;
    }
    let repo = env!("CARGO_MANIFEST_DIR");
    let commit = first_line("git", &["-C", repo, "rev-parse", "--short=12", "HEAD"]);
    let dirty = Command::new("git")
        .args(["-C", repo, "status", "--porcelain", "--untracked-files=no"])
        .stdin(Stdio::null())
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    if dirty {
        format!("{commit} (with uncommitted changes)")
    } else {
        commit
    }
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let cpus = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags"))
        .map(|v| v.split_whitespace().collect())
        .unwrap_or_default();
    let of_note = ["fsrm", "erms", "avx512f", "amx_tile", "hypervisor"];
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_default();
    Machine {
        cpu,
        cpus,
        cpu_flags_of_note: of_note
            .iter()
            .filter(|f| flags.contains(f))
            .map(|f| f.to_string())
            .collect(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        os,
        gcc: first_line("gcc", &["--version"]),
        valgrind: first_line("valgrind", &["--version"]),
        commit: commit(),
        loadavg_start: loadavg(),
        loadavg_end: String::new(),
    }
}

#[derive(Serialize)]
struct Report {
    mode: &'static str,
    machine: Machine,
    seconds: f64,
    stall: Option<std::result::Result<stall::StallResult, String>>,
    apply: Option<std::result::Result<apply_time::ApplyResult, String>>,
    scale: Option<std::result::Result<scale::ScaleResult, String>>,
    overhead: Option<std::result::Result<overhead::OverheadResult, String>>,
    memory: Option<std::result::Result<memory::MemoryResult, String>>,
    side: Option<std::result::Result<side::SideResult, String>>,
    timeline: Option<std::result::Result<timeline::TimelineResult, String>>,
}

/// Run one section if selected, print its table (or its error) now.
fn section<T>(
    args: &Args,
    name: &str,
    failures: &mut Vec<String>,
    run: impl FnOnce() -> Result<T>,
    render: impl Fn(&T) -> String,
) -> Option<std::result::Result<T, String>> {
    if !args.only.iter().any(|s| s == name) {
        return None;
    }
    let started = Instant::now();
    let r = run();
    match &r {
        Ok(v) => println!("{}", render(v)),
        Err(e) => {
            println!("\n### {name}: failed\n\n{e}\n");
            failures.push(format!("{name}: {e}"));
        }
    }
    progress(&format!("{name}: {:.1} s", started.elapsed().as_secs_f64()));
    Some(r)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("hotpatch-bench: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut cfg = if args.quick {
        Config::quick()
    } else {
        Config::full()
    };
    if let Some(f) = &args.apply_functions {
        cfg.apply_functions = f.clone();
        // Only the sizes asked for.
        cfg.apply_big = None;
    }
    if let Some(t) = &args.apply_threads {
        cfg.apply_threads = t.clone();
    }
    if let Some(r) = args.apply_runs {
        cfg.apply_runs = r;
    }
    if let Some(r) = args.apply_route {
        cfg.apply_routes = vec![r];
    }
    let started = Instant::now();
    let work = match Work::new() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("hotpatch-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut m = machine();
    println!(
        "# hotpatch-bench ({})\n\n{} × {} ({}), kernel {}, {}; {}; commit {}; load average {}",
        if cfg.quick { "quick" } else { "full" },
        m.cpus,
        m.cpu,
        m.cpu_flags_of_note.join(" "),
        m.kernel,
        m.os,
        m.gcc,
        m.commit,
        m.loadavg_start
    );
    let mut failures = Vec::new();
    let stall = section(
        &args,
        "stall",
        &mut failures,
        || stall::run(&cfg, &work),
        stall::render,
    );
    let apply = section(
        &args,
        "apply",
        &mut failures,
        || apply_time::run(&cfg, &work),
        apply_time::render,
    );
    let scale = section(
        &args,
        "scale",
        &mut failures,
        || scale::run(&cfg, &work),
        scale::render,
    );
    let overhead = section(
        &args,
        "overhead",
        &mut failures,
        || overhead::run(&cfg, &work),
        overhead::render,
    );
    let memory = section(
        &args,
        "memory",
        &mut failures,
        || memory::run(&cfg, &work),
        memory::render,
    );
    let side = section(
        &args,
        "side",
        &mut failures,
        || side::run(&cfg, &work),
        side::render,
    );
    let timeline = section(
        &args,
        "timeline",
        &mut failures,
        || timeline::run(&cfg, &work),
        timeline::render,
    );
    if let (Some(dir), Some(Ok(t))) = (&args.svg_out, &timeline) {
        let path = dir.join("lateness.svg");
        let written =
            std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, timeline::chart(t, &m.commit)));
        match written {
            Ok(()) => progress(&format!("wrote {}", path.display())),
            Err(e) => failures.push(format!("timeline: cannot write {}: {e}", path.display())),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    m.loadavg_end = loadavg();
    println!(
        "\nTotal: {seconds:.0} s; load average at the end {}",
        m.loadavg_end
    );
    let report = Report {
        mode: if cfg.quick { "quick" } else { "full" },
        machine: m,
        seconds,
        stall,
        apply,
        scale,
        overhead,
        memory,
        side,
        timeline,
    };
    if let Some(path) = &args.json_out {
        let text = match serde_json::to_string_pretty(&report) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("hotpatch-bench: cannot serialise the results: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("hotpatch-bench: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        progress(&format!("wrote {}", path.display()));
    }
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("hotpatch-bench: {} section(s) failed:", failures.len());
        for f in &failures {
            eprintln!("  {f}");
        }
        ExitCode::FAILURE
    }
}
