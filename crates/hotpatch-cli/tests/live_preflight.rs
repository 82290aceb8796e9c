//! Preflight (issue 9, defects 6, 7 and 15): what would make an apply fail
//! or kill the target is found before the first write and refused with
//! the reason — the target alive, its code and its memory map exactly as
//! before, a stopped or traced process left stopped or traced — and
//! `hotpatch doctor` prints the same findings.

#[path = "common/live.rs"]
mod live;

use live::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const SANDBOXED_C: &str = include_str!("live/sandboxed.c");
const TRACER_C: &str = include_str!("live/tracer.c");
const PATCH_C: &str = r#"#include "hotpatch.h"
long f_a(long x) { return x * 5 + 2; }
HOTPATCH_REPLACE(f, f_a);
"#;

struct Built {
    dir: tempfile::TempDir,
    exe: PathBuf,
    patch: PathBuf,
}

fn build() -> Built {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = build_target(dir.path(), "gcc", "sandboxed", SANDBOXED_C, &[]);
    let patch = build_patch(dir.path(), "fix", PATCH_C);
    Built { dir, exe, patch }
}

/// A running `sandboxed MODE`.
struct Sandboxed {
    proc: Proc,
    f: u64,
}

impl Sandboxed {
    fn start(b: &Built, mode: &str) -> Sandboxed {
        let mut proc = Proc::spawn(Command::new(&b.exe).arg(mode));
        let ready = proc.line("ready", |l| l.starts_with("ready f="));
        let f = u64::from_str_radix(ready.trim_start_matches("ready f=0x"), 16).expect("f address");
        Sandboxed { proc, f }
    }

    fn pid(&self) -> i32 {
        self.proc.pid()
    }

    /// 0: f is the original, 1: f is the patch's.
    fn version(&mut self) -> u8 {
        self.proc.send("call 11");
        let l = self.proc.line("call 11", |l| l.starts_with("call 11 "));
        match l.as_str() {
            "call 11 f=34" => 0,
            "call 11 f=57" => 1,
            other => panic!("f(11) answered {other:?}"),
        }
    }
}

fn apply_run(pid: i32, patch: &Path) -> Run {
    hotpatch(&["apply".to_string(), pid.to_string(), patch.display().to_string()])
}

fn doctor(pid: i32) -> Value {
    hotpatch(&["doctor".to_string(), pid.to_string(), "--json".to_string()]).json()
}

/// The finding of `check` in a `doctor --json` report.
fn finding<'a>(report: &'a Value, check: &str) -> &'a Value {
    report["findings"]
        .as_array()
        .expect("findings[]")
        .iter()
        .find(|f| f["check"] == check)
        .unwrap_or_else(|| panic!("no {check} finding in {report}"))
}

/// Apply to `t`, which must be refused with a message naming each of
/// `names`; the target stays alive, its code bytes and its memory map
/// unchanged, f still the original. Returns the message.
fn refused(t: &mut Sandboxed, patch: &Path, names: &[&str]) -> String {
    refused_as(t, t.pid(), patch, names)
}

/// [`refused`], with the apply naming `as_pid` (the target's pid or one
/// of its threads).
fn refused_as(t: &mut Sandboxed, as_pid: i32, patch: &Path, names: &[&str]) -> String {
    let pid = t.pid();
    let code = code_bytes(pid, t.f);
    let before = maps(pid);
    let run = apply_run(as_pid, patch);
    let msg = run.stderr.trim_end();
    assert!(t.proc.alive(), "the target died: {msg}");
    assert_eq!(maps(pid), before, "the memory map changed: {msg}");
    assert_eq!(code_bytes(pid, t.f), code, "code changed: {msg}");
    assert_eq!(t.version(), 0);
    let msg = run.failure().to_string();
    for n in names {
        assert!(msg.contains(n), "{msg:?} does not mention {n:?}");
    }
    msg
}

fn state_of(pid: i32, tid: i32) -> (char, i32) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
    let field = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(str::trim)
            .unwrap_or("")
            .to_string()
    };
    let state = field("State:").chars().next().unwrap_or('?');
    (state, field("TracerPid:").parse().unwrap_or(-1))
}

fn tids(pid: i32) -> Vec<i32> {
    let mut t: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    t.sort_unstable();
    t
}

/// Wait (bounded) until `pred` holds for every thread of `pid`.
fn wait_threads(pid: i32, what: &str, pred: impl Fn((char, i32)) -> bool) {
    let deadline = Instant::now() + WAIT;
    while !tids(pid).into_iter().all(|t| pred(state_of(pid, t))) {
        assert!(Instant::now() < deadline, "process {pid} never became {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_seccomp_filter_that_kills_is_found_before_anything_is_written() {
    let _serial = serial();
    let b = build();
    // Defect 6: the bootstrap's mprotect used to kill this target.
    let mut t = Sandboxed::start(&b, "kill-mprotect");
    let msg = refused(&mut t, &b.patch, &["seccomp", "mprotect", "KILL_PROCESS"]);
    assert!(msg.contains("nothing in it was changed"), "{msg}");
    let report = doctor(t.pid());
    assert_eq!(report["verdict"], "refuse");
    let s = finding(&report, "seccomp");
    assert_eq!(s["verdict"], "refuse");
    assert!(s["detail"].as_str().unwrap().contains("mprotect"), "{s}");
    let text = hotpatch(&["doctor".to_string(), t.pid().to_string()]);
    assert_eq!(text.code(), 0, "{}", text.stderr);
    assert!(
        text.stdout
            .starts_with(&format!("process {} (sandboxed): not patchable\n", t.pid())),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout.lines().any(|l| l.trim_start().starts_with("seccomp")
            && l.contains("refuse")
            && l.contains("KILL_PROCESS")),
        "{}",
        text.stdout
    );
    // Reading the filters stopped each thread for a moment only: none is
    // left stopped or traced, and the main thread's read of stdin
    // restarted (it answers).
    assert_no_thread_stopped(t.pid());
    for tid in tids(t.pid()) {
        assert_eq!(state_of(t.pid(), tid).1, 0, "thread {tid} still traced");
    }
    assert_eq!(t.version(), 0);

    // Only the helper thread's filter kills memfd_create (the state
    // record): the calls run on the main thread, which has no filter, and
    // never on the helper (it would kill the process). The preflight read
    // the main thread only; the helper is checked when it is picked.
    for _ in 0..4 {
        let mut t = Sandboxed::start(&b, "kill-memfd");
        let helper = other_thread(t.pid());
        let applied = apply(t.pid(), &b.patch, &[]);
        assert_eq!(
            applied["functions"].as_array().map(Vec::len),
            Some(1),
            "{applied}"
        );
        assert!(t.proc.alive(), "the target died");
        assert_eq!(t.version(), 1);
        revert(t.pid(), None);
        assert_eq!(t.version(), 0);
        // doctor reads every thread's filter: it names the helper's, and
        // says the calls avoid it.
        let report = doctor(t.pid());
        let s = finding(&report, "seccomp");
        assert_eq!(s["verdict"], "ok", "{report}");
        let detail = s["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains("memfd_create gets KILL_PROCESS")
                && detail.contains(&format!("thread {helper}"))
                && detail.contains("without a filter only"),
            "{detail}"
        );
        assert!(t.proc.alive());
    }
}

/// A thread of `pid` other than its main one (tids are not ordered by
/// age once pids wrap around).
fn other_thread(pid: i32) -> i32 {
    tids(pid)
        .into_iter()
        .find(|&t| t != pid)
        .expect("a second thread")
}

#[test]
fn a_seccomp_filter_that_returns_an_error_is_refused_and_leaves_no_mapping() {
    let _serial = serial();
    let b = build();
    // An errno on mprotect used to leave four 1 MiB call regions behind.
    let mut t = Sandboxed::start(&b, "errno-mprotect");
    refused(&mut t, &b.patch, &["mprotect", "ERRNO(1"]);
    let report = doctor(t.pid());
    let s = finding(&report, "seccomp");
    assert_eq!(s["verdict"], "refuse");
    assert!(
        s["detail"].as_str().unwrap().contains("mprotect gets ERRNO(1"),
        "{s}"
    );
}

#[test]
fn filters_that_allow_what_hotpatch_does_let_the_apply_through() {
    let _serial = serial();
    let b = build();
    for mode in ["allow", "deny-wx"] {
        let mut t = Sandboxed::start(&b, mode);
        let applied = apply(t.pid(), &b.patch, &[]);
        assert_eq!(
            applied["functions"].as_array().map(Vec::len),
            Some(1),
            "{applied}"
        );
        assert_eq!(t.version(), 1, "{mode}");
        let report = doctor(t.pid());
        assert_eq!(finding(&report, "seccomp")["verdict"], "ok", "{mode}: {report}");
        // No thread under a filter is lent a real-time priority for the
        // trip (it could refuse to give it back): none has one now.
        for tid in tids(t.pid()) {
            let policy =
                std::fs::read_to_string(format!("/proc/{}/task/{tid}/sched", t.pid())).unwrap_or_default();
            assert!(
                policy
                    .lines()
                    .any(|l| l.starts_with("policy") && l.trim_end().ends_with(" 0")),
                "{mode}: thread {tid} is not SCHED_OTHER:\n{policy}"
            );
        }
        assert!(t.proc.alive());
    }
}

#[test]
fn revert_is_checked_for_what_revert_does() {
    let _serial = serial();
    let b = build();
    let mut t = Sandboxed::start(&b, "none");
    apply(t.pid(), &b.patch, &[]);
    assert_eq!(t.version(), 1);
    // From now on memfd_create kills the process: an apply may make it
    // (the record), a revert never does.
    t.proc.send("restrict");
    t.proc.line("restricted", |l| l == "restricted");
    let reverted = revert(t.pid(), None);
    assert_eq!(reverted.as_array().map(Vec::len), Some(1), "{reverted}");
    assert_eq!(t.version(), 0);
    refused(&mut t, &b.patch, &["memfd_create", "KILL_PROCESS"]);
}

#[test]
fn mdwe_is_refused_and_the_bootstrap_unmaps_what_it_mapped() {
    let _serial = serial();
    let b = build();
    let mut t = Sandboxed::start(&b, "mdwe");
    for _ in 0..2 {
        let msg = refused(&mut t, &b.patch, &["MDWE", "mprotect", "nothing is left"]);
        assert!(!msg.contains("stays mapped"), "{msg}");
    }
}

#[test]
fn a_stopped_process_is_refused_and_stays_stopped() {
    let _serial = serial();
    let b = build();
    let mut t = Sandboxed::start(&b, "none");
    let pid = t.pid();
    let code = code_bytes(pid, t.f);
    let before = maps(pid);
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .expect("kill")
            .success()
    );
    wait_threads(pid, "stopped", |(s, _)| s == 'T');
    let msg = apply_run(pid, &b.patch).failure().to_string();
    assert!(
        msg.contains("stopped by a signal") && msg.contains(&format!("kill -CONT {pid}")),
        "{msg}"
    );
    for tid in tids(pid) {
        assert_eq!(state_of(pid, tid), ('T', 0), "thread {tid} after the refusal");
    }
    let report = doctor(pid);
    assert_eq!(finding(&report, "stopped")["verdict"], "refuse", "{report}");
    for tid in tids(pid) {
        assert_eq!(state_of(pid, tid), ('T', 0), "thread {tid} after doctor");
    }
    assert_eq!(maps(pid), before);
    assert_eq!(code_bytes(pid, t.f), code);
    assert!(
        Command::new("kill")
            .args(["-CONT", &pid.to_string()])
            .status()
            .expect("kill")
            .success()
    );
    assert_eq!(t.version(), 0);
}

#[test]
fn a_traced_process_is_refused_naming_its_tracer() {
    let _serial = serial();
    let b = build();
    let mut t = Sandboxed::start(&b, "none");
    let pid = t.pid();
    std::fs::write(b.dir.path().join("tracer.c"), TRACER_C).expect("write tracer.c");
    compile("gcc", &["-O2", "-o", "tracer", "tracer.c"], b.dir.path());
    let mut tracer = Proc::spawn(Command::new(b.dir.path().join("tracer")).arg(pid.to_string()));
    tracer.line("tracing", |l| l.starts_with("tracing "));
    let by = tracer.pid();
    wait_threads(pid, "traced", |(_, tr)| tr == by);
    let msg = refused(&mut t, &b.patch, &[&format!("traced by pid {by} (tracer)")]);
    assert!(!msg.contains("run as root"), "{msg}");
    for tid in tids(pid) {
        assert_eq!(
            state_of(pid, tid).1,
            by,
            "thread {tid} is no longer traced by {by}"
        );
    }
    let report = doctor(pid);
    let f = finding(&report, "tracer");
    assert_eq!(f["verdict"], "refuse");
    assert!(
        f["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("pid {by} (tracer)")),
        "{f}"
    );
    drop(tracer);
    wait_threads(pid, "untraced", |(_, tr)| tr == 0);
    assert_eq!(t.version(), 0);
}

#[test]
fn what_the_process_is_is_named() {
    let _serial = serial();
    let b = build();
    // A thread's id instead of the process's: the lock and the record are
    // per process, so two tools naming two threads must not both go on.
    let mut t = Sandboxed::start(&b, "none");
    let helper = other_thread(t.pid());
    let pid = t.pid();
    refused_as(
        &mut t,
        helper,
        &b.patch,
        &[&format!("{helper} is a thread of process {pid}")],
    );
    drop(t);

    // Its main thread exited, the helper still runs.
    let t = Sandboxed::start(&b, "leader-exit");
    let pid = t.pid();
    let deadline = Instant::now() + WAIT;
    while state_of(pid, pid).0 != 'Z' {
        assert!(Instant::now() < deadline, "the main thread never exited");
        std::thread::sleep(Duration::from_millis(2));
    }
    let msg = apply_run(pid, &b.patch).failure().to_string();
    assert!(
        msg.contains("main thread has exited while 1 other thread still runs"),
        "{msg}"
    );
    assert!(!msg.contains("no mapped image"), "{msg}");
    drop(t);

    // A zombie.
    let zombie = Proc::spawn(Command::new("sh").args(["-c", "exit 0"]));
    let z = zombie.pid();
    let deadline = Instant::now() + WAIT;
    while state_of(z, z).0 != 'Z' {
        assert!(Instant::now() < deadline, "never a zombie");
        std::thread::sleep(Duration::from_millis(2));
    }
    let msg = apply_run(z, &b.patch).failure().to_string();
    assert!(msg.contains("zombie"), "{msg}");
    drop(zombie);

    // A kernel thread (none is visible inside a PID namespace of its own).
    let kthread = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/status")).is_ok_and(|s| s.contains("Kthread:\t1"))
        });
    match kthread {
        Some(k) => {
            let msg = apply_run(k, &b.patch).failure().to_string();
            assert!(msg.contains("kernel thread"), "{msg}");
            assert!(!msg.contains("no mapped image"), "{msg}");
        }
        None => eprintln!("no kernel thread in /proc (a PID namespace?): that case is not run"),
    }
}

#[test]
fn doctor_all_reports_every_process() {
    let _serial = serial();
    let b = build();
    let t = Sandboxed::start(&b, "kill-mprotect");
    let run = hotpatch(&["doctor", "--all"]);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    let line = run
        .stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&t.pid().to_string()))
        .unwrap_or_else(|| panic!("no line for {}:\n{}", t.pid(), run.stdout));
    // Passive: the filter is reported, not read.
    assert!(
        line.contains("maybe patchable") && line.contains("seccomp"),
        "{line}"
    );
    let json: Value = hotpatch(&["doctor", "--all", "--json"]).json();
    let me = json
        .as_array()
        .expect("array")
        .iter()
        .find(|p| p["pid"] == t.pid())
        .expect("the target in --all --json");
    assert_eq!(me["verdict"], "unknown");
}
