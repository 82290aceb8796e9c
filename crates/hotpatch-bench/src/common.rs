//! What every section needs: a build directory with a C compiler, target
//! processes that are always killed and reaped, and small statistics.

use hotpatch::engine::{Applied, ApplyOptions, FlipMode};
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

pub type Result<T> = std::result::Result<T, String>;

/// `include/hotpatch.h`, for patch libraries.
const HOTPATCH_H: &str = include_str!("../../../include/hotpatch.h");

/// A temporary build directory (removed on drop) holding `hotpatch.h`.
pub struct Work {
    dir: tempfile::TempDir,
}

impl Work {
    pub fn new() -> Result<Work> {
        let dir = tempfile::Builder::new()
            .prefix("hotpatch-bench-")
            .tempdir()
            .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        let work = Work { dir };
        work.write("hotpatch.h", HOTPATCH_H)?;
        Ok(work)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, name: &str, text: &str) -> Result<PathBuf> {
        let path = self.path(name);
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(path)
    }

    /// Run `gcc ARGS` in the build directory.
    pub fn gcc(&self, args: &[&str]) -> Result<()> {
        run_tool(Command::new("gcc").args(args).current_dir(self.dir()), "gcc")
    }

    /// Build the patch library `NAME.so` from `NAME.c` (headers from the
    /// build directory).
    pub fn patch_library(&self, name: &str) -> Result<PathBuf> {
        let (out, src) = (format!("{name}.so"), format!("{name}.c"));
        self.gcc(&["-O2", "-shared", "-fPIC", "-I.", "-o", &out, &src])?;
        Ok(self.path(&out))
    }

    /// Start `gcc ARGS` without waiting (for the long SQLite builds).
    pub fn gcc_spawn(&self, args: &[&str]) -> Result<Spawned> {
        let child = Command::new("gcc")
            .args(args)
            .current_dir(self.dir())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run gcc: {e}"))?;
        Ok(Spawned { child: Some(child) })
    }
}

/// A helper process (a compiler, a tool) killed and reaped if not waited for.
pub struct Spawned {
    child: Option<Child>,
}

impl Spawned {
    pub fn wait(mut self, what: &str) -> Result<()> {
        let Some(child) = self.child.take() else {
            return Err(format!("{what}: already waited for"));
        };
        let out = child.wait_with_output().map_err(|e| format!("{what}: {e}"))?;
        succeeded(&out, what)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Run a command to completion (killed and reaped if this thread unwinds,
/// since `output` owns the child) and fail with its stderr.
pub fn run_tool(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    succeeded(&out, what)
}

/// A finished command's outcome: its stderr when it failed.
fn succeeded(out: &std::process::Output, what: &str) -> Result<()> {
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Apply options for the detour patches: the bench's targets call the
/// unprepared functions directly from their own image (declared `noipa`
/// there, so no caller relies on IPA register allocation across the call).
pub fn detour_options() -> ApplyOptions {
    ApplyOptions {
        allow_direct_calls: true,
        ..ApplyOptions::default()
    }
}

/// How long the threads stayed stopped for a patch whose every function
/// must be a detour written with all threads stopped; an error if one
/// went another way.
pub fn detour_stop_us(applied: &Applied) -> Result<u64> {
    let mut stopped = 0;
    for f in &applied.functions {
        match (f.route, f.mode) {
            ("detour", FlipMode::Stopped { stopped_us }) => stopped = stopped.max(stopped_us),
            (route, mode) => {
                return Err(format!(
                    "`{}` went in by route `{route}`, mode {mode:?}, not a detour with threads stopped",
                    f.name
                ));
            }
        }
    }
    Ok(stopped)
}

/// A target process that answers commands on stdin with lines ending in
/// `end`. Killed and reaped on drop, on every path.
pub struct Target {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    pub ready: String,
}

impl Target {
    /// Start `program ARGS` and wait for its line starting with `ready`.
    pub fn start(program: &Path, args: &[String], timeout: Duration) -> Result<Target> {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        // From here on `target` owns the child: any early return kills it.
        let (tx, rx) = channel();
        let mut target = Target {
            child,
            stdin,
            lines: rx,
            ready: String::new(),
        };
        let Some(stdout) = stdout else {
            return Err("no stdout pipe".into());
        };
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + timeout;
        loop {
            let line = target.next_line(deadline)?;
            if line.starts_with("ready") {
                target.ready = line;
                return Ok(target);
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn next_line(&mut self, deadline: Instant) -> Result<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(l) => Ok(l),
            Err(RecvTimeoutError::Timeout) => Err(format!("target {} did not answer in time", self.pid())),
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.try_wait().ok().flatten();
                Err(format!(
                    "target {} closed its output (exit status: {})",
                    self.pid(),
                    status.map_or("still running".into(), |s| s.to_string())
                ))
            }
        }
    }

    /// Send one command; the answer's lines, up to (not including) `end`.
    pub fn command(&mut self, cmd: &str, timeout: Duration) -> Result<Vec<String>> {
        let pid = self.pid();
        let stdin = self.stdin.as_mut().ok_or("target stdin closed")?;
        writeln!(stdin, "{cmd}")
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("target {pid}: cannot send `{cmd}`: {e}"))?;
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let line = self.next_line(deadline)?;
            if line == "end" {
                return Ok(out);
            }
            if let Some(err) = line.strip_prefix("error ") {
                return Err(format!("target {pid}: `{cmd}`: {err}"));
            }
            out.push(line);
        }
    }

    /// The value of `key=0x...` in the ready line.
    pub fn ready_address(&self, key: &str) -> Result<u64> {
        self.ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .and_then(parse_hex)
            .ok_or_else(|| format!("no {key}= in the target's ready line `{}`", self.ready))
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stdin.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn parse_hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

/// The value after `key ` in the lines of an answer.
pub fn field(lines: &[String], key: &str) -> Result<u64> {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("no `{key}` in the answer {lines:?}"))
}

pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::INFINITY, f64::min)
}

pub fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Sleep until `deadline` (no-op if past).
pub fn sleep_until(deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    if !left.is_zero() {
        std::thread::sleep(left);
    }
}

/// Format a number for a table: `-` for NaN, sensible digits otherwise.
pub fn num(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Print a markdown table.
pub fn table(title: &str, header: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = format!("\n### {title}\n\n| {} |\n|", header.join(" | "));
    for _ in header {
        s.push_str("---|");
    }
    s.push('\n');
    for r in rows {
        s.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    s
}

pub fn progress(msg: &str) {
    eprintln!("[bench] {msg}");
}
