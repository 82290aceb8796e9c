//! Planning a 1-function patch on a big image, old path against new, in
//! one run (issue 10). Prints figures; asserts nothing.
//!
//!     cargo bench -p hotpatch --bench planning            # full
//!     cargo bench -p hotpatch --bench planning -- --quick # CI smoke run
//!
//! old: read the whole file, `Image::parse`, `Planner::new` (survey and
//! symbol index of the whole image), then the function's method.
//! new: `ImageFile::open` (headers), `Planner::lean` with the one name,
//! then the same method. "symbol" rows resolve the name only (what a
//! patch's pointer to a target symbol needs); "method" rows plan the
//! function. Peak memory (maxrss) is measured in a child per path.

use hotpatch::image::ImageFile;
use hotpatch::plan::Planner;
use std::time::{Duration, Instant};

/// A prepared image of about 90 MB, built here: `functions` padded C
/// functions (gcc `-fpatchable-function-entry=8,6`) and an 80 MiB
/// constant, so that the file is as big as libLLVM and the function to
/// plan is prepared (libLLVM's are not).
fn big_prepared(dir: &std::path::Path, functions: usize) -> Option<String> {
    use std::fmt::Write;
    let mut c = String::from("const char blob[80 << 20] = {1};\n");
    for i in 0..functions {
        let _ = writeln!(c, "int f{i}(int x) {{ return x * {i} + {}; }}", i % 7);
    }
    c.push_str("int main(int c, char **v) { (void)v; return f1(c) + blob[c]; }\n");
    let source = dir.join("big.c");
    std::fs::write(&source, c).ok()?;
    let exe = dir.join("big_prepared");
    let ok = std::process::Command::new("cc")
        .args(["-O1", "-fpatchable-function-entry=8,6", "-o"])
        .arg(&exe)
        .arg(&source)
        .status()
        .ok()?
        .success();
    ok.then(|| exe.display().to_string())
}

/// (image, function): a big prepared image built here, the biggest
/// library on Debian 12 with libllvm14, libc, and this workspace's own
/// debug `hotpatch` binary (full symbols).
fn subjects(dir: &std::path::Path, quick: bool) -> Vec<(String, String)> {
    let functions = if quick { 2000 } else { 40000 };
    let mut s: Vec<(String, String)> = big_prepared(dir, functions)
        .map(|exe| (exe, format!("f{}", functions / 2)))
        .into_iter()
        .collect();
    s.extend([
        (
            "/usr/lib/x86_64-linux-gnu/libLLVM-14.so.1".to_string(),
            "LLVMGetModuleIdentifier".to_string(),
        ),
        (
            "/usr/lib/x86_64-linux-gnu/libc.so.6".to_string(),
            "strtol".to_string(),
        ),
    ]);
    let exe = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/debug/hotpatch");
    if std::fs::metadata(exe).is_ok() {
        s.push((exe.to_string(), "hotpatch::engine::apply::apply".to_string()));
    }
    s
}

fn run(old: bool, method: bool, path: &str, name: &str) -> Result<String, String> {
    if old {
        let data =
            hotpatch::image::file::read_regular(std::path::Path::new(path)).map_err(|e| e.to_string())?;
        let image = hotpatch::Image::parse(path, data).map_err(|e| e.to_string())?;
        let planner = Planner::new(&image);
        outcome(&planner, method, name)
    } else {
        let file = ImageFile::open(path, path).map_err(|e| e.to_string())?;
        let planner = Planner::lean(&file, &[name]).map_err(|e| e.to_string())?;
        outcome(&planner, method, name)
    }
}

fn outcome(planner: &Planner<'_>, method: bool, name: &str) -> Result<String, String> {
    if method {
        match planner.method(name) {
            Ok((entry, hotpatch::plan::Method::Prepared(_))) => Ok(format!("prepared {entry:#x}")),
            Ok((entry, hotpatch::plan::Method::Detour { .. })) => Ok(format!("detour {entry:#x}")),
            Err(e) => Ok(format!("refused: {e}")),
        }
    } else {
        planner
            .symbol(name)
            .map(|s| format!("{:#x}", s.address))
            .map_err(|e| e.to_string())
    }
}

/// Peak resident memory of one run in a child process, in MiB: the
/// child's `VmHWM` (`ru_maxrss` of a child counts the parent's memory
/// before `exec`).
fn maxrss(old: bool, method: bool, path: &str, name: &str) -> Option<f64> {
    let me = std::env::current_exe().ok()?;
    let out = std::process::Command::new(me)
        .args([
            "--child",
            if old { "old" } else { "new" },
            if method { "method" } else { "symbol" },
            path,
            name,
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let kib: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    Some(kib / 1024.0)
}

/// `VmHWM` of this process, in KiB.
fn peak_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let get = |k: usize| args.get(i + k).cloned().unwrap_or_default();
        let result = run(get(1) == "old", get(2) == "method", &get(3), &get(4));
        println!("{}", peak_kib().unwrap_or(0));
        std::process::exit(i32::from(result.is_err()));
    }
    let quick = args.iter().any(|a| a == "--quick");
    let runs = if quick { 2 } else { 9 };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "| image | MB | what | result | old median ms | new median ms | ratio | old maxrss MiB | new maxrss MiB |"
    );
    println!("|---|---:|---|---|---:|---:|---:|---:|---:|");
    let Ok(dir) = tempfile::tempdir() else {
        println!("no temporary directory");
        return;
    };
    eprintln!("building a big prepared image (about 30 s)...");
    for (path, name) in subjects(dir.path(), quick) {
        let Ok(meta) = std::fs::metadata(&path) else {
            println!("| {path} | (missing) | | | | | | | |");
            continue;
        };
        for method in [false, true] {
            let mut times = [Vec::new(), Vec::new()];
            let mut results = [String::new(), String::new()];
            for _ in 0..runs {
                for (k, old) in [true, false].into_iter().enumerate() {
                    let start = Instant::now();
                    let r = run(old, method, &path, &name);
                    times[k].push(start.elapsed());
                    results[k] = r.unwrap_or_else(|e| format!("error: {e}"));
                }
            }
            for t in &mut times {
                t.sort();
            }
            let (old, new) = (times[0][runs / 2], times[1][runs / 2]);
            let result = if results[0] == results[1] {
                results[0].clone()
            } else {
                format!("DIFFER: old {} / new {}", results[0], results[1])
            };
            let new_rss = maxrss(false, method, &path, &name);
            let old_rss = maxrss(true, method, &path, &name);
            let mib = |m: Option<f64>| m.map_or("?".to_string(), |m| format!("{m:.0}"));
            println!(
                "| {} | {:.0} | {} `{}` | {} | {:.2} | {:.2} | {:.0}× | {} | {} |",
                path.rsplit('/').next().unwrap_or(&path),
                meta.len() as f64 / 1e6,
                if method { "method" } else { "symbol" },
                hotpatch::shorten::name(&name),
                result.chars().take(60).collect::<String>(),
                ms(old),
                ms(new),
                ms(old) / ms(new).max(1e-6),
                mib(old_rss),
                mib(new_rss)
            );
        }
    }
}
