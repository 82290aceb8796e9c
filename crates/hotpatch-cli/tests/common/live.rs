//! Helpers for the live-patching tests: C targets and patches compiled at
//! test time, target processes killed and reaped on drop, the `hotpatch`
//! binary run with a bounded timeout, and oracles read straight from
//! `/proc` (code bytes through `/proc/PID/mem`, mappings, thread states).
//!
//! Each `live_*.rs` test file includes this module with
//! `#[path = "common/live.rs"] mod live;`.

#![allow(dead_code)] // each test binary uses a different part of this module

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The target of most live tests (see the comment at its top).
pub const TARGET_C: &str = include_str!("../live/target.c");
/// Patch A and patch B of `f` and `g` in [`TARGET_C`].
pub const PATCH_A_C: &str = include_str!("../live/patch_a.c");
pub const PATCH_B_C: &str = include_str!("../live/patch_b.c");
/// A pre-forking server (master and workers) calling the same `f` and `g`.
pub const FORKING_C: &str = include_str!("../live/forking.c");

/// The versions of `f` and `g` in [`TARGET_C`]: 0 original, 1 A, 2 B.
pub fn f_version(v: u8, x: i64) -> i64 {
    match v {
        0 => x * 3 + 1,
        1 => x * 5 + 2,
        _ => x * 7 + 3,
    }
}

pub fn g_version(v: u8, x: i64) -> i64 {
    match v {
        0 => x ^ 0x5a5a,
        1 => x ^ 0x1234,
        _ => x ^ 0x4321,
    }
}

/// A generous bound for anything the tests wait for.
pub const WAIT: Duration = Duration::from_secs(30);

/// Live tests of one binary run one at a time: their busy threads would
/// otherwise compete for the machine's cores and slow each other down.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// `include/` of the repository (hotpatch.h).
pub fn include_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../include")
}

// ---------------------------------------------------------------- builds

/// Run a compiler, panic with its stderr if it fails.
pub fn compile(cc: &str, args: &[&str], dir: &Path) {
    let out = Command::new(cc)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cc}: {e}"));
    assert!(
        out.status.success(),
        "{cc} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Write `source` to `dir/name.c` and build a prepared executable `dir/name`
/// (`-O2 -pthread -fpatchable-function-entry=8,6`, plus `extra`).
pub fn build_target(dir: &Path, cc: &str, name: &str, source: &str, extra: &[&str]) -> PathBuf {
    let mut flags = vec!["-fpatchable-function-entry=8,6"];
    flags.extend_from_slice(extra);
    build_unprepared(dir, cc, name, source, &flags)
}

/// Write `source` to `dir/name.c` and build an executable `dir/name`
/// without padding (`-O2 -pthread`, plus `extra`).
pub fn build_unprepared(dir: &Path, cc: &str, name: &str, source: &str, extra: &[&str]) -> PathBuf {
    let src = format!("{name}.c");
    std::fs::write(dir.join(&src), source).expect("write target source");
    let mut args = vec!["-O2", "-pthread", "-o", name];
    args.extend_from_slice(extra);
    args.push(&src);
    compile(cc, &args, dir);
    dir.join(name)
}

/// Write `source` to `dir/name.c` and build the patch library `dir/name.so`.
pub fn build_patch(dir: &Path, name: &str, source: &str) -> PathBuf {
    let src = format!("{name}.c");
    let out = format!("{name}.so");
    std::fs::write(dir.join(&src), source).expect("write patch source");
    let include = include_dir();
    compile(
        "gcc",
        &[
            "-O2",
            "-shared",
            "-fPIC",
            "-I",
            include.to_str().expect("utf-8 path"),
            "-o",
            &out,
            &src,
        ],
        dir,
    );
    dir.join(out)
}

/// `mkfifo dir/name`.
pub fn mkfifo(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let out = Command::new("mkfifo").arg(&path).output().expect("run mkfifo");
    assert!(
        out.status.success(),
        "mkfifo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

// ------------------------------------------------------------- processes

/// A child process, killed and reaped on drop (pass or fail); its stdout
/// lines arrive on a channel.
pub struct Proc {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Every line read so far.
    pub seen: Vec<String>,
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            stdin: child.stdin.take(),
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The first new line matching `pred`, waiting at most `timeout`.
    pub fn try_line(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return Some(l);
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Like [`Proc::try_line`], panicking with what was seen on a timeout.
    pub fn line(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        match self.try_line(WAIT, pred) {
            Some(l) => l,
            None => {
                let status = self.child.try_wait();
                panic!(
                    "process {} never printed {what} (status {status:?}); last lines: {:?}",
                    self.pid(),
                    self.seen.iter().rev().take(20).collect::<Vec<_>>()
                )
            }
        }
    }

    /// Collect the lines printed so far, without waiting.
    pub fn drain(&mut self) {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
    }

    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("write {line:?} to process {}: {e}", self.child.id()));
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the target's workers counted (`stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub calls: u64,
    pub old: u64,
    pub a: u64,
    pub b: u64,
    /// Results that are no version of the function.
    pub bad: u64,
    /// Results of another version than the one expected.
    pub late: u64,
}

/// A running [`TARGET_C`].
pub struct Target {
    pub proc: Proc,
    /// The entries of `f` and `g`, as the target prints them.
    pub f: u64,
    pub g: u64,
}

/// How the target's workers run (see [`TARGET_C`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    Busy,
    Idle,
    Duty,
}

fn hex_field(line: &str, key: &str) -> u64 {
    let v = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"));
    u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap_or_else(|_| panic!("bad {key} in {line:?}"))
}

fn num_field(line: &str, key: &str) -> i64 {
    let v = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"));
    v.parse().unwrap_or_else(|_| panic!("bad {key} in {line:?}"))
}

impl Target {
    /// Start `exe` with `workers` worker threads; with `fifo`, also the
    /// blocked threads. Waits until every thread runs.
    pub fn start(exe: &Path, workers: usize, fifo: Option<&Path>, mode: Workers) -> Target {
        Target::start_command(Command::new(exe), workers, fifo, mode)
    }

    /// [`Target::start`] with the target run by `cmd` (a wrapper that
    /// `exec`s it, say), which gets the target's arguments appended.
    pub fn start_command(mut cmd: Command, workers: usize, fifo: Option<&Path>, mode: Workers) -> Target {
        cmd.arg(workers.to_string())
            .arg(fifo.map_or_else(|| "-".into(), |p| p.as_os_str().to_owned()))
            .arg(match mode {
                Workers::Busy => "busy",
                Workers::Idle => "idle",
                Workers::Duty => "duty",
            });
        let mut proc = Proc::spawn(&mut cmd);
        let ready = proc.line("ready", |l| l.starts_with("ready "));
        Target {
            f: hex_field(&ready, "f="),
            g: hex_field(&ready, "g="),
            proc,
        }
    }

    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    /// From now on every call must return version `v` (-1: any); returns
    /// once every worker has made 100 calls since it saw that.
    pub fn expect(&mut self, v: i32) {
        self.proc.send(&format!("expect {v}"));
        let want = format!("expecting {v}");
        self.proc.line(&want, |l| l == want);
    }

    pub fn stats(&mut self) -> Stats {
        self.proc.send("stats");
        let l = self.proc.line("stats", |l| l.starts_with("stats "));
        let n = |k: &str| num_field(&l, k) as u64;
        let s = Stats {
            calls: n("calls="),
            old: n("old="),
            a: n("a="),
            b: n("b="),
            bad: n("bad="),
            late: n("late="),
        };
        if s.bad != 0 {
            eprintln!("bad results: {l}");
        }
        s
    }

    /// `f(x)` and `g(x)` called by the target's main thread.
    pub fn call(&mut self, x: i64) -> (i64, i64) {
        self.proc.send(&format!("call {x}"));
        let prefix = format!("call {x} ");
        let l = self.proc.line(&prefix, |l| l.starts_with(&prefix));
        (num_field(&l, "f="), num_field(&l, "g="))
    }

    /// Which version (0, 1, 2) `f` and `g` run, as seen by the main thread.
    pub fn version(&mut self) -> (u8, u8) {
        let x = 11;
        let (f, g) = self.call(x);
        let fv = (0..3)
            .find(|&v| f_version(v, x) == f)
            .unwrap_or_else(|| panic!("f({x}) = {f} is no version of f"));
        let gv = (0..3)
            .find(|&v| g_version(v, x) == g)
            .unwrap_or_else(|| panic!("g({x}) = {g} is no version of g"));
        (fv, gv)
    }

    /// The padding and entry bytes of `f` and `g` (see [`code_bytes`]).
    pub fn code(&self) -> Vec<u8> {
        let mut v = code_bytes(self.pid(), self.f);
        v.extend(code_bytes(self.pid(), self.g));
        v
    }
}

// ------------------------------------------------------------- the tool

/// The outcome of one `hotpatch` run.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

impl Run {
    /// The exit code; panics if the tool was killed by a signal.
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("hotpatch died by a signal: {self:?}"))
    }

    pub fn json(&self) -> Value {
        assert_eq!(self.code(), 0, "hotpatch failed: {}", self.stderr);
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }

    /// The failure contract: exit code 1, nothing on stdout, one line on
    /// stderr starting `hotpatch: `, no panic. Returns that line. Lines
    /// `hotpatch: warning: …` (e.g. no syslog socket for the audit record)
    /// come before it and are not the error.
    pub fn failure(&self) -> &str {
        assert_eq!(self.status.code(), Some(1), "exit code; {self:?}");
        assert!(self.stdout.is_empty(), "output on stdout: {self:?}");
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        let error = error_lines(&self.stderr);
        assert!(
            self.stderr.ends_with('\n') && error.lines().count() == 1,
            "not one line: {:?}",
            self.stderr
        );
        assert!(error.starts_with("hotpatch: "), "{}", self.stderr);
        error.trim_end()
    }
}

/// `stderr` without its leading `hotpatch: warning: …` lines.
pub fn error_lines(stderr: &str) -> &str {
    let mut rest = stderr;
    while rest.starts_with("hotpatch: warning: ") {
        rest = rest.split_once('\n').map_or("", |(_, r)| r);
    }
    rest
}

/// The `hotpatch` binary under test.
pub fn hotpatch_command<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hotpatch"));
    cmd.env_remove("HOTPATCH_LOG").env_remove("RUST_LOG").args(args);
    cmd
}

/// Spawn with piped output, read on threads (no pipe can fill up).
pub fn spawn_piped(cmd: &mut Command) -> (Child, impl FnOnce() -> (String, String) + use<>) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    (child, move || {
        (out.join().unwrap_or_default(), err.join().unwrap_or_default())
    })
}

/// Run `hotpatch ARGS…`, killing it (and failing) if it takes longer than
/// `limit`.
pub fn hotpatch_within<S: AsRef<std::ffi::OsStr>>(limit: Duration, args: &[S]) -> Run {
    run_within(limit, &mut hotpatch_command(args))
}

/// Run `cmd` (a `hotpatch` command, with its environment), killing it (and
/// failing) if it takes longer than `limit`.
pub fn run_within(limit: Duration, cmd: &mut Command) -> Run {
    let started = Instant::now();
    let (mut child, output) = spawn_piped(cmd);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for hotpatch") {
            break s;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "hotpatch {:?} hung: still running after {limit:?}",
                cmd.get_args().collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let (stdout, stderr) = output();
    Run {
        status,
        stdout,
        stderr,
        took: started.elapsed(),
    }
}

pub fn hotpatch<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    hotpatch_within(WAIT, args)
}

/// `hotpatch apply PID PATCH --json [EXTRA…]`, which must succeed.
pub fn apply(pid: i32, patch: &Path, extra: &[&str]) -> Value {
    let mut args = vec![
        "apply".to_string(),
        pid.to_string(),
        patch.display().to_string(),
        "--json".to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    hotpatch(&args).json()
}

/// `hotpatch list PID --json`, which must succeed.
pub fn list(pid: i32) -> Value {
    hotpatch(&["list".to_string(), pid.to_string(), "--json".to_string()]).json()
}

/// The ids of the patches `list` shows, oldest first.
pub fn listed_ids(pid: i32) -> Vec<u64> {
    list(pid)["patches"]
        .as_array()
        .expect("patches[]")
        .iter()
        .map(|p| p["id"].as_u64().expect("id"))
        .collect()
}

/// `hotpatch revert PID ID|--all --json`, which must succeed.
pub fn revert(pid: i32, which: Option<u64>) -> Value {
    let which = which.map_or_else(|| "--all".to_string(), |id| id.to_string());
    hotpatch(&["revert".to_string(), pid.to_string(), which, "--json".to_string()]).json()
}

// ------------------------------------------------------------ oracles

/// `len` bytes at `addr` of process `pid`, through `/proc/PID/mem`.
pub fn read_mem(pid: i32, addr: u64, len: usize) -> Vec<u8> {
    let file = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open /proc/PID/mem");
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, addr)
        .unwrap_or_else(|e| panic!("read {len} bytes at {addr:#x} of {pid}: {e}"));
    buf
}

/// Write `bytes` at `addr` of process `pid`, through `/proc/PID/mem`
/// (behind the tool's back).
pub fn write_mem(pid: i32, addr: u64, bytes: &[u8]) {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .expect("open /proc/PID/mem for writing");
    file.write_all_at(bytes, addr)
        .unwrap_or_else(|e| panic!("write {} bytes at {addr:#x} of {pid}: {e}", bytes.len()));
}

/// Where the state record of `pid` is mapped (`/memfd:hotpatch-state`),
/// and whether privately (`p`) — `None` if it has none.
pub fn state_mapping(pid: i32) -> Option<(u64, bool)> {
    maps(pid)
        .lines()
        .find(|l| l.contains("/memfd:hotpatch-state"))
        .map(|l| {
            let start = l.split('-').next().expect("start");
            let perms = l.split_whitespace().nth(1).expect("perms");
            (
                u64::from_str_radix(start, 16).expect("hex start"),
                perms.ends_with('p'),
            )
        })
}

/// A function's 6 bytes of padding and first 8 bytes (entry nops or
/// endbr64 + nops, and what follows).
pub fn code_bytes(pid: i32, entry: u64) -> Vec<u8> {
    read_mem(pid, entry - 6, 14)
}

/// What `revert` promises about `code` (from [`Target::code`]) compared
/// with `original`: every function's entry bytes are the original ones;
/// its padding is either the original nops or the dormant route a revert
/// leaves — a jump (`ff 25` through the slot, or `e9` to a trampoline).
pub fn check_reverted(code: &[u8], original: &[u8]) -> Result<(), String> {
    if code.len() != original.len() {
        return Err(format!("{} bytes read, {} before", code.len(), original.len()));
    }
    for (c, o) in code.chunks(14).zip(original.chunks(14)) {
        if c[6..] != o[6..] {
            return Err(format!(
                "entry bytes {:02x?}, originally {:02x?}",
                &c[6..],
                &o[6..]
            ));
        }
        let pad = &c[..6];
        let route = pad.starts_with(&[0xff, 0x25]) || pad.iter().take(2).any(|&b| b == 0xe9);
        if pad != &o[..6] && !route {
            return Err(format!(
                "padding {pad:02x?} is neither the original {:02x?} nor a jump",
                &o[..6]
            ));
        }
    }
    Ok(())
}

/// `/proc/PID/maps`.
pub fn maps(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps")
}

/// Whether any mapping of `pid` is of `path`.
pub fn maps_file(pid: i32, path: &Path) -> bool {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let path = path.to_str().expect("utf-8 path");
    maps(pid).lines().any(|l| l.ends_with(path))
}

/// Threads of `pid` in a stopped state (`t` or `T` in `/proc/PID/task/*/stat`).
pub fn stopped_threads(pid: i32) -> Vec<(i32, char)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue; // the thread exited
        };
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .unwrap_or('?');
        if state == 't' || state == 'T' {
            let tid = e.file_name().to_string_lossy().parse().unwrap_or(0);
            out.push((tid, state));
        }
    }
    out
}

/// No thread of `pid` stays stopped (a thread may be caught between a
/// stop and its resume; give it 2 s to move on).
pub fn assert_no_thread_stopped(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let stopped = stopped_threads(pid);
        if stopped.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid}: threads left stopped: {stopped:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A small deterministic generator (the seed is printed by each test).
pub struct XorShift(pub u64);

impl XorShift {
    pub fn seeded() -> XorShift {
        let seed = std::env::var("HOTPATCH_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            })
            | 1;
        eprintln!("seed {seed} (HOTPATCH_TEST_SEED={seed} repeats the run)");
        XorShift(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

/// Write `text` to a FIFO (the target holds it open for reading and
/// writing, so this never blocks).
pub fn write_fifo(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open fifo");
    f.write_all(text.as_bytes()).expect("write fifo");
}

/// The statics target (two files, each with a `static int counter`) and
/// its patch; see the comments in the sources.
pub const STATICS_A_C: &str = include_str!("../live/statics_a.c");
pub const STATICS_B_C: &str = include_str!("../live/statics_b.c");
pub const STATICS_PATCH_C: &str = include_str!("../live/statics_patch.c");

/// Build the statics target (gcc, prepared) as `dir/statics`.
pub fn build_statics(dir: &Path) -> PathBuf {
    std::fs::write(dir.join("statics_a.c"), STATICS_A_C).expect("write statics_a.c");
    std::fs::write(dir.join("statics_b.c"), STATICS_B_C).expect("write statics_b.c");
    compile(
        "gcc",
        &[
            "-O2",
            "-fpatchable-function-entry=8,6",
            "-o",
            "statics",
            "statics_a.c",
            "statics_b.c",
        ],
        dir,
    );
    dir.join("statics")
}

/// A running statics target.
pub struct Statics {
    pub proc: Proc,
}

/// What one `call X` of the statics target printed: compute(X), a.c's
/// counter, b.c's counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticsCall {
    pub r: i64,
    pub a: i64,
    pub b: i64,
}

impl Statics {
    pub fn start(exe: &Path) -> Statics {
        let mut proc = Proc::spawn(&mut Command::new(exe));
        proc.line("ready", |l| l.starts_with("ready "));
        Statics { proc }
    }

    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    pub fn call(&mut self, x: i64) -> StaticsCall {
        self.proc.send(&format!("call {x}"));
        let prefix = format!("call {x} ");
        let l = self.proc.line(&prefix, |l| l.starts_with(&prefix));
        StaticsCall {
            r: num_field(&l, "r="),
            a: num_field(&l, "a="),
            b: num_field(&l, "b="),
        }
    }
}

/// The address of `symbol` (a `.symtab` name, optionally after the
/// `FILE` symbol `file`) in process `pid` running `exe`, from `readelf`
/// and `/proc/PID/maps` (a PIE: load bias = the first mapping of `exe`).
pub fn symbol_in_process(pid: i32, exe: &Path, file: Option<&str>, symbol: &str) -> u64 {
    let text = String::from_utf8(
        Command::new("readelf")
            .arg("-sW")
            .arg(exe)
            .output()
            .expect("run readelf")
            .stdout,
    )
    .expect("utf-8");
    let mut current_file = String::new();
    let mut found = None;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || !f[0].ends_with(':') {
            continue;
        }
        if f[3] == "FILE" {
            current_file = f[7].to_string();
            continue;
        }
        if f[7] == symbol && file.is_none_or(|w| w == current_file) {
            found = Some(u64::from_str_radix(f[1], 16).expect("hex value"));
            break;
        }
    }
    let value = found.unwrap_or_else(|| panic!("{symbol} (file {file:?}) not in readelf -s"));
    let exe = std::fs::canonicalize(exe).expect("canonical exe");
    let base = maps(pid)
        .lines()
        .find(|l| l.ends_with(exe.to_str().expect("utf-8")))
        .and_then(|l| l.split('-').next())
        .map(|s| u64::from_str_radix(s, 16).expect("hex"))
        .expect("exe mapped");
    base + value
}
