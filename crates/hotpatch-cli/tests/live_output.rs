//! The answer of every command written to a stdout that cannot take it (a
//! closed pipe, a full disk): no panic, exit code 3, stderr says what WAS
//! done, and what was done stands.

#[path = "common/live.rs"]
mod live;

use live::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where the tool's stdout goes.
#[derive(Clone, Copy, Debug)]
enum Sink {
    /// A pipe whose reading end is closed before the tool starts (EPIPE).
    ClosedPipe,
    /// `/dev/full` (ENOSPC).
    Full,
}

/// Run `hotpatch ARGS` with stdout into `sink`, killing it (and failing)
/// after [`WAIT`]. Returns (exit code, stderr).
fn run_into(sink: Sink, args: &[&str]) -> (i32, String) {
    let stdout = match sink {
        Sink::ClosedPipe => {
            let (reader, writer) = std::io::pipe().expect("pipe");
            drop(reader);
            Stdio::from(writer)
        }
        Sink::Full => Stdio::from(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .expect("open /dev/full"),
        ),
    };
    let mut child = hotpatch_command(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hotpatch");
    let mut err = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if started.elapsed() > WAIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("hotpatch {args:?} still running after {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stderr = reader.join().unwrap_or_default();
    let code = status
        .code()
        .unwrap_or_else(|| panic!("hotpatch {args:?} died by a signal: {status:?}; {stderr}"));
    assert!(
        !stderr.contains("panicked"),
        "{args:?} ({sink:?}) panicked: {stderr}"
    );
    (code, stderr)
}

#[test]
fn apply_list_revert_into_a_closed_or_full_stdout() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let exe = build_target(d, "gcc", "target", TARGET_C, &[]);
    let patch = build_patch(d, "patch_a", PATCH_A_C);
    let mut target = Target::start(&exe, 2, None, Workers::Duty);
    let pid = target.pid().to_string();
    let patch_arg = patch.display().to_string();

    for (sink, json) in [(Sink::ClosedPipe, false), (Sink::Full, true)] {
        let mut args = vec!["apply", &pid, &patch_arg];
        if json {
            args.push("--json");
        }
        let (code, stderr) = run_into(sink, &args);
        assert_eq!(code, 3, "apply into {sink:?}: {stderr}");
        assert!(
            stderr.contains("WAS applied") && stderr.contains("could not be written"),
            "{stderr}"
        );
        // It was applied: listed, and the code runs the patch.
        assert_eq!(listed_ids(target.pid()).len(), 1, "{sink:?}");
        assert_eq!(target.version(), (1, 1));

        let (code, stderr) = run_into(sink, &["list", &pid]);
        assert_eq!(code, 3, "list into {sink:?}: {stderr}");
        assert!(stderr.contains("could not be written"), "{stderr}");

        let (code, stderr) = run_into(sink, &["revert", &pid, "--all"]);
        assert_eq!(code, 3, "revert into {sink:?}: {stderr}");
        assert!(stderr.contains("WERE reverted"), "{stderr}");
        assert!(listed_ids(target.pid()).is_empty());
        assert_eq!(target.version(), (0, 0));
    }
    assert!(target.proc.alive());
}

#[test]
fn check_and_prepare_into_a_closed_stdout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let exe = build_target(d, "gcc", "target", TARGET_C, &[]);
    let exe_arg = exe.display().to_string();
    for sink in [Sink::ClosedPipe, Sink::Full] {
        for args in [
            vec!["check", &exe_arg],
            vec!["check", &exe_arg, "--functions", "--json"],
        ] {
            let (code, stderr) = run_into(sink, &args);
            assert_eq!(code, 3, "{args:?} into {sink:?}: {stderr}");
            assert!(stderr.contains("could not be written"), "{stderr}");
        }
        let out = d.join(format!("prepared-{sink:?}"));
        let out_arg = out.display().to_string();
        let (code, stderr) = run_into(sink, &["prepare", &exe_arg, "-o", &out_arg]);
        assert_eq!(code, 3, "prepare into {sink:?}: {stderr}");
        assert!(stderr.contains("WAS written"), "{stderr}");
        assert!(Path::new(&out).is_file());
    }
    // keygen and sign write their files, then say so.
    let keys = d.join("keys");
    std::fs::create_dir(&keys).expect("mkdir keys");
    let keys_arg = keys.display().to_string();
    let (code, stderr) = run_into(Sink::ClosedPipe, &["keygen", "tester", "--dir", &keys_arg]);
    assert_eq!(code, 3, "keygen: {stderr}");
    assert!(stderr.contains("WERE written"), "{stderr}");
    assert!(keys.join("tester.key").is_file() && keys.join("tester.pub").is_file());
    let key_arg = keys.join("tester.key").display().to_string();
    let signed = d.join("signed");
    let signed_arg = signed.display().to_string();
    let (code, stderr) = run_into(
        Sink::Full,
        &["sign", &exe_arg, "--key", &key_arg, "-o", &signed_arg],
    );
    assert_eq!(code, 3, "sign: {stderr}");
    assert!(stderr.contains("WAS signed") && signed.is_file(), "{stderr}");
    // `--help` (clap) into a closed pipe does not panic either.
    let (code, stderr) = run_into(Sink::ClosedPipe, &["--help"]);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn help_describes_what_the_tool_does_now() {
    let out = Command::new(env!("CARGO_BIN_EXE_hotpatch"))
        .arg("--help")
        .output()
        .expect("run hotpatch --help");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(!text.contains("(soon)"), "{text}");
    let first = text.lines().next().unwrap_or_default();
    for word in ["apply", "revert", "running processes"] {
        assert!(
            first.contains(word),
            "the first line does not say {word:?}: {first}"
        );
    }
}
