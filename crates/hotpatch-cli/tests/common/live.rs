//! Helpers for the live-patching tests: the live targets and patches, the
//! `hotpatch` binary run with a bounded timeout, and what its output
//! promises. The generic helpers (C compiled at test time, processes killed
//! and reaped on drop, oracles read straight from `/proc`, the seeded
//! generator) live in `hotpatch-testkit` and are re-exported here.
//!
//! Each `live_*.rs` test file includes this module with
//! `#[path = "common/live.rs"] mod live;`.

#![allow(dead_code)] // each test binary uses a different part of this module

// The helpers both crates' tests use (building, processes, oracles, the
// seeded generator): `use live::*` brings them in with the rest. Each test
// binary uses a different part of them.
#[allow(unused_imports)]
pub use hotpatch_testkit::{build::*, fields::*, fifo::*, oracle::*, proc::*, rng::*};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
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

// ------------------------------------------------------------- processes

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

/// `hotpatch revert PID ID|--all --json`, which must succeed: its whole
/// answer (`pid`, `reverted`, `remote_calls`).
pub fn revert_json(pid: i32, which: Option<u64>) -> Value {
    let which = which.map_or_else(|| "--all".to_string(), |id| id.to_string());
    hotpatch(&["revert".to_string(), pid.to_string(), which, "--json".to_string()]).json()
}

/// The patches [`revert_json`] reverted (its `reverted` array).
pub fn revert(pid: i32, which: Option<u64>) -> Value {
    let mut answer = revert_json(pid, which);
    assert!(answer["reverted"].is_array(), "revert --json: {answer}");
    answer["reverted"].take()
}

// ------------------------------------------------------------ oracles

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

/// The statics target (two files, each with a `static int counter`) and
/// its patch; see the comments in the sources.
pub const STATICS_A_C: &str = include_str!("../live/statics_a.c");
pub const STATICS_B_C: &str = include_str!("../live/statics_b.c");
pub const STATICS_PATCH_C: &str = include_str!("../live/statics_patch.c");

/// Build the statics target (gcc, prepared) as `dir/statics`.
pub fn build_statics(dir: &Path) -> PathBuf {
    build_sources(
        dir,
        "gcc",
        "statics",
        &[("statics_a.c", STATICS_A_C), ("statics_b.c", STATICS_B_C)],
        &["-O2", "-fpatchable-function-entry=8,6"],
    )
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

/// `symbol`'s address in the copy of `patch` that the newest patch record
/// of process `pid` loaded (by content: a memfd named after the first 16
/// hex digits of its SHA-256, at the handle's load bias).
pub fn symbol_in_loaded_patch(pid: i32, patch: &Path, symbol: &str) -> u64 {
    let state = list(pid);
    let newest = state["patches"]
        .as_array()
        .and_then(|p| p.last())
        .unwrap_or_else(|| panic!("no patch recorded: {state}"));
    let sha = newest["sha256"].as_str().expect("sha256");
    let handle = newest["handle"].as_u64().expect("handle");
    // The handle is glibc's link map: l_addr (the load bias) comes first.
    let bias = u64::from_le_bytes(read_mem(pid, handle, 8).try_into().expect("8 bytes"));
    let prefix = format!("/memfd:hotpatch-patch-{}-", &sha[..16]);
    assert!(
        maps(pid).lines().any(|l| l.contains(&prefix)),
        "no mapping of {prefix}… in the process"
    );
    bias + symbol_value(patch, None, symbol)
}

/// `hotpatch build --source SRC --diff DIFF --build COMMAND --binary BINARY
/// -o OUT --json`, killed (and failing) after `limit`.
pub fn hotpatch_build(
    src: &Path,
    diff: &Path,
    command: &str,
    binary: &Path,
    out: &Path,
    limit: Duration,
) -> Run {
    hotpatch_within(
        limit,
        &[
            "build".to_string(),
            "--source".into(),
            src.display().to_string(),
            "--diff".into(),
            diff.display().to_string(),
            "--build".into(),
            command.into(),
            "--binary".into(),
            binary.display().to_string(),
            "-o".into(),
            out.display().to_string(),
            "--json".into(),
        ],
    )
}

/// C sources a `*-sys` dev-dependency bundles, in cargo's registry:
/// `below` is the path from the registry's source directories, e.g.
/// `libz-sys-1.1.12/src/zlib`; `marker` a file that must be there.
pub fn registry_source(below: &str, marker: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .expect("CARGO_HOME or HOME");
    let registry = home.join("registry/src");
    let found = std::fs::read_dir(&registry)
        .unwrap_or_else(|e| panic!("{}: {e}", registry.display()))
        .filter_map(Result::ok)
        .map(|e| e.path().join(below))
        .find(|p| p.join(marker).is_file());
    found.unwrap_or_else(|| {
        panic!(
            "no {below} under {} (it is a dev-dependency of hotpatch-cli: cargo fetches it)",
            registry.display()
        )
    })
}

/// Run `command` with `sh -c` in `dir`; it must succeed.
pub fn sh(dir: &Path, command: &str) {
    let out = Command::new("sh")
        .args(["-c", command])
        .current_dir(dir)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "{command}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
