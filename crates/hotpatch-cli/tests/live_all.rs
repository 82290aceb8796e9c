//! `hotpatch apply --all` and `hotpatch revert --everywhere`: every process
//! of the host that maps the patch's target library, found by build-id.
//!
//! Two programs linked against `libfee.so` (build 1), one against another
//! build of it (same name, build 2), one that does not link it, and one in
//! its own mount and pid namespace where the patch file does not exist.
//! Every caller counts wrong answers from two threads meanwhile.

#[path = "common/live.rs"]
mod live;

use live::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const LIB_C: &str = include_str!("live/fee_lib.c");
const USER_C: &str = include_str!("live/fee_user.c");
const PATCH_C: &str = include_str!("live/fee_patch.c");

/// A running program of `fee_user.c`.
struct FeeUser {
    proc: Proc,
}

impl FeeUser {
    fn start(cmd: &mut Command) -> FeeUser {
        let mut proc = Proc::spawn(cmd);
        proc.line("ready", |l| l.starts_with("ready "));
        FeeUser { proc }
    }

    /// fee(x) as the program computes it, and its count of wrong answers.
    fn fee(&mut self, x: i32) -> (i64, i64) {
        self.proc.send(&x.to_string());
        let line = self.proc.line("fee=", |l| l.starts_with("fee="));
        let field = |key: &str| -> i64 {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        };
        (field("fee="), field("bad="))
    }
}

struct Built {
    lib1: PathBuf,
    user_a: PathBuf,
    user_b: PathBuf,
    user_other: PathBuf,
    /// Without threads: for many processes at once.
    user_idle: PathBuf,
    /// In a directory of its own, hidden from the namespaced process.
    patch: PathBuf,
}

fn build_id(path: &Path) -> String {
    let notes = stdout_of(Command::new("readelf").arg("-n").arg(path));
    notes
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .unwrap_or_else(|| panic!("no build-id in {}", path.display()))
        .trim()
        .to_string()
}

fn build(dir: &Path) -> Built {
    let lib = |sub: &str, variant: &str| -> PathBuf {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).expect("mkdir");
        build_sources(
            &d,
            "gcc",
            "libfee.so",
            &[("fee_lib.c", LIB_C)],
            &[
                "-O2",
                "-shared",
                "-fPIC",
                "-fpatchable-function-entry=8,6",
                &format!("-DVARIANT={variant}"),
            ],
        )
    };
    let lib1 = lib("lib1", "1");
    let lib2 = lib("lib2", "2");
    std::fs::write(dir.join("fee_user.c"), USER_C).expect("write fee_user.c");
    let user = |name: &str, lib: &Path, extra: &str| -> PathBuf {
        let libdir = lib.parent().expect("lib dir").display().to_string();
        compile(
            "gcc",
            &[
                extra,
                "-O2",
                "-pthread",
                &format!("-DWHO=\"{name}\""),
                "-o",
                name,
                "fee_user.c",
                &format!("-L{libdir}"),
                &format!("-Wl,-rpath,{libdir}"),
                "-lfee",
            ],
            dir,
        );
        dir.join(name)
    };
    let patch_dir = dir.join("patches");
    std::fs::create_dir_all(&patch_dir).expect("mkdir");
    let patch = build_sources(
        &patch_dir,
        "gcc",
        "fee_patch.so",
        &[("fee_patch.c", PATCH_C)],
        &[
            "-O2",
            "-shared",
            "-fPIC",
            &include_arg(),
            &format!("-DBUILD_ID=\"{}\"", build_id(&lib1)),
        ],
    );
    Built {
        user_a: user("user_a", &lib1, "-DBUSY"),
        user_b: user("user_b", &lib1, "-DBUSY"),
        user_other: user("user_other", &lib2, "-DBUSY"),
        user_idle: user("user_idle", &lib1, "-DIDLE"),
        lib1,
        patch,
    }
}

/// The outcome of `pid` in a run's `processes`, if listed.
fn outcome_of(run: &Value, pid: i32) -> Option<Value> {
    run["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .find(|p| p["pid"] == pid)
        .cloned()
}

fn apply_all(patch: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["apply", "--all", patch.to_str().expect("path"), "--json"];
    args.extend_from_slice(extra);
    let run = hotpatch(&args);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    run.json()
}

/// The pid (in ours) of the process of `exe` that lives in a pid
/// namespace below ours.
fn namespaced_pid(exe: &Path) -> i32 {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let nested = status
                .lines()
                .any(|l| l.starts_with("NSpid:") && l.split_whitespace().count() > 2);
            if nested && std::fs::read_link(format!("/proc/{pid}/exe")).ok().as_deref() == Some(exe) {
                return pid;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no namespaced {}",
            exe.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn apply_all_reaches_every_process_of_the_build_and_revert_everywhere_undoes_it() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let b = build(dir.path());
    let mut a = FeeUser::start(&mut Command::new(&b.user_a));
    let mut b1 = FeeUser::start(&mut Command::new(&b.user_b));
    let mut other = FeeUser::start(&mut Command::new(&b.user_other));
    let bystander = Proc::spawn(Command::new("sleep").arg("300"));
    // In its own mount and pid namespace, with the patch's directory
    // covered by an empty tmpfs: the file exists only on the host.
    let mut boxed = FeeUser::start(Command::new("unshare").args([
        "--mount",
        "--pid",
        "--fork",
        "--kill-child",
        "--mount-proc",
        "sh",
        "-c",
        &format!(
            "mount -t tmpfs none {} && test ! -e {} && exec {}",
            b.patch.parent().expect("dir").display(),
            b.patch.display(),
            b.user_a.display()
        ),
    ]));
    let boxed_pid = namespaced_pid(&b.user_a);
    for u in [&mut a, &mut b1, &mut boxed] {
        assert_eq!(u.fee(10), (31, 0));
    }
    assert_eq!(other.fee(10), (32, 0));

    // 1. Every process of build 1, the namespaced one too; build 2 skipped.
    let run = apply_all(&b.patch, &[]);
    for pid in [a.proc.pid(), b1.proc.pid(), boxed_pid] {
        let o = outcome_of(&run, pid).unwrap_or_else(|| panic!("{pid} not in {run:#}"));
        assert_eq!(o["outcome"], "applied", "{o:#}");
        assert_eq!(o["image"].as_str(), Some(b.lib1.to_str().expect("path")), "{o:#}");
    }
    let boxed_outcome = outcome_of(&run, boxed_pid).expect("boxed");
    assert!(boxed_outcome["ns_pid"].as_i64().is_some(), "{boxed_outcome:#}");
    let skipped = outcome_of(&run, other.proc.pid()).expect("the other build is listed");
    assert_eq!(skipped["outcome"], "skipped");
    assert!(
        skipped["reason"]
            .as_str()
            .is_some_and(|r| r.contains("another build")),
        "{skipped:#}"
    );
    assert!(outcome_of(&run, bystander.pid()).is_none());
    assert_eq!(run["summary"]["applied"], 3, "{run:#}");
    assert_eq!(run["summary"]["failed"], 0);
    for u in [&mut a, &mut b1, &mut boxed] {
        assert_eq!(u.fee(10), (52, 0));
    }
    assert_eq!(other.fee(10), (32, 0));
    // `status` shows the namespaced process with its pid there.
    let status = hotpatch(&["status", "--json"]).json();
    let listed = status
        .as_array()
        .expect("status is an array")
        .iter()
        .find(|p| p["pid"] == boxed_pid)
        .cloned()
        .expect("the namespaced process is in status");
    assert_eq!(listed["ns_pid"], boxed_outcome["ns_pid"], "{listed:#}");
    assert!(
        listed["entries"]
            .as_array()
            .is_some_and(|e| e.iter().all(|e| e["state"] == "patched"))
    );

    // 2. Idempotent: the same patch again changes nothing.
    let again = apply_all(&b.patch, &[]);
    for pid in [a.proc.pid(), b1.proc.pid(), boxed_pid] {
        let o = outcome_of(&again, pid).expect("listed");
        assert_eq!(o["outcome"], "already-applied", "{o:#}");
    }
    assert_eq!(again["summary"]["applied"], 0);
    assert_eq!(listed_ids(a.proc.pid()).len(), 1);

    // 3. The policy's exclusions: a new process of an excluded executable
    //    is left alone, with the reason.
    let mut late_b = FeeUser::start(&mut Command::new(&b.user_b));
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!("[exclude]\nexecutables = [\"{}\"]\n", b.user_b.display()),
    )
    .expect("policy");
    let excluded = apply_all(&b.patch, &["--policy", policy.to_str().expect("path")]);
    let o = outcome_of(&excluded, late_b.proc.pid()).expect("listed");
    assert_eq!(o["outcome"], "skipped");
    assert!(
        o["reason"]
            .as_str()
            .is_some_and(|r| r.contains("excluded by the policy")),
        "{o:#}"
    );
    assert_eq!(late_b.fee(10), (31, 0));

    // 4. Text output: one line per process and the summary.
    let text = hotpatch(&["apply", "--all", b.patch.to_str().expect("path")]);
    assert_eq!(text.code(), 0, "{}", text.stderr);
    assert!(
        text.stdout.contains(&format!("process {}", late_b.proc.pid()))
            && text.stdout.contains("applied, ")
            && text.stdout.contains("already applied"),
        "{}",
        text.stdout
    );
    assert_eq!(late_b.fee(10), (52, 0));

    // 5. Revert everywhere, by the file and then (nothing left) by digest.
    let run = hotpatch(&[
        "revert",
        "--everywhere",
        b.patch.to_str().expect("path"),
        "--json",
    ]);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    let reverted = run.json();
    for pid in [a.proc.pid(), b1.proc.pid(), boxed_pid, late_b.proc.pid()] {
        let o = outcome_of(&reverted, pid).unwrap_or_else(|| panic!("{pid} not in {reverted:#}"));
        assert_eq!(o["outcome"], "reverted", "{o:#}");
    }
    for u in [&mut a, &mut b1, &mut boxed, &mut late_b] {
        assert_eq!(u.fee(10), (31, 0));
    }
    let sha = reverted["sha256"].as_str().expect("sha256").to_string();
    let none = hotpatch(&["revert", "--everywhere", &sha, "--json"]).json();
    assert_eq!(none["summary"]["total"], 0, "{none:#}");
    drop(bystander);
}

#[test]
fn apply_all_refuses_a_patch_without_a_build_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let patch = build_patch(
        dir.path(),
        "nameonly",
        "#include \"hotpatch.h\"\nHOTPATCH_TARGET(\"libfee.so\", \"\");\nint fee_fixed(int x) { return x; }\nHOTPATCH_REPLACE(fee, fee_fixed);\n",
    );
    let run = hotpatch(&["apply", "--all", patch.to_str().expect("path")]);
    assert_eq!(run.code(), 1);
    assert!(
        run.stderr.contains("matched by build-id") && run.stderr.contains("nothing was changed"),
        "{}",
        run.stderr
    );
}

/// Processes of the crowd test: `HOTPATCH_TEST_PROCESSES`, 40 unless set
/// (the full size: `HOTPATCH_TEST_PROCESSES=200 cargo test -p
/// hotpatch-cli --test live_all crowd`).
fn crowd_size() -> usize {
    std::env::var("HOTPATCH_TEST_PROCESSES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(40)
}

#[test]
fn apply_all_to_a_crowd_with_processes_exiting_meanwhile() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let b = build(dir.path());
    let n = crowd_size();
    let mut crowd: Vec<FeeUser> = (0..n)
        .map(|_| FeeUser::start(&mut Command::new(&b.user_idle)))
        .collect();
    // Every fourth one exits while the apply runs.
    let leaving = |i: usize| i % 4 == 1;
    let (mut child, output) = spawn_piped(&mut hotpatch_command(&[
        "apply",
        "--all",
        b.patch.to_str().expect("path"),
        "--json",
    ]));
    // Spread over the run: some leave before the scan, some after.
    for (i, u) in crowd.iter_mut().enumerate() {
        if leaving(i) {
            u.proc.send("exit");
            std::thread::sleep(std::time::Duration::from_millis(3));
        }
    }
    let deadline = std::time::Instant::now() + WAIT * 4;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "apply --all did not finish");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let (stdout, stderr) = output();
    assert!(status.success(), "{stderr}");
    let run: Value = serde_json::from_str(&stdout).expect("json");
    eprintln!(
        "apply --all: {n} processes in {:.1} ms: {}",
        run["elapsed_us"].as_f64().unwrap_or(0.0) / 1000.0,
        run["summary"]
    );
    assert_eq!(run["summary"]["failed"], 0, "{run:#}");
    for (i, u) in crowd.iter_mut().enumerate() {
        let pid = u.proc.pid();
        let o = outcome_of(&run, pid);
        if leaving(i) {
            // Applied before it left, skipped because it left, or gone
            // before the scan: never failed, never half-patched.
            if let Some(o) = o {
                let fine = o["outcome"] == "applied"
                    || (o["outcome"] == "skipped"
                        && o["reason"].as_str().is_some_and(|r| r.contains("exited")));
                assert!(fine, "{o:#}");
            }
        } else {
            let o = o.unwrap_or_else(|| panic!("{pid} not in the run"));
            assert_eq!(o["outcome"], "applied", "{o:#}");
            assert_eq!(u.fee(10), (52, 0), "process {pid}");
        }
    }
    let run = hotpatch(&[
        "revert",
        "--everywhere",
        b.patch.to_str().expect("path"),
        "--json",
    ]);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    for (i, u) in crowd.iter_mut().enumerate() {
        if !leaving(i) {
            assert_eq!(u.fee(10), (31, 0));
        }
    }
}
