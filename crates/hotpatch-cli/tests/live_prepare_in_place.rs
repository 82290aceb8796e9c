//! `hotpatch prepare LIB -o LIB` while a process runs LIB: the process
//! keeps running and computing (the file is replaced by a rename, never
//! truncated under its mapping), and LIB is the prepared file.

#[path = "common/live.rs"]
mod live;

use live::*;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

const LIB_C: &str = include_str!("live/prepare_lib.c");
const RUNNER_C: &str = include_str!("live/prepare_runner.c");

#[test]
fn prepare_in_place_leaves_running_processes_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("lib.c"), LIB_C).expect("write lib.c");
    compile(
        "gcc",
        &[
            "-O2",
            "-shared",
            "-fPIC",
            "-fpatchable-function-entry=8,6",
            "-o",
            "lib.so",
            "lib.c",
        ],
        d,
    );
    let lib = d.join("lib.so");
    std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o750)).expect("chmod");
    let runner = build_unprepared(d, "gcc", "runner", RUNNER_C, &["-ldl"]);

    // What the prepared file must be: the same command on a copy.
    let copy = d.join("copy.so");
    std::fs::copy(&lib, &copy).expect("copy lib.so");
    let expected = d.join("expected.so");
    let run = hotpatch(&[
        "prepare".to_string(),
        copy.display().to_string(),
        "-o".to_string(),
        expected.display().to_string(),
    ]);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    let expected = std::fs::read(&expected).expect("read expected.so");
    assert_ne!(
        expected,
        std::fs::read(&lib).expect("read lib.so"),
        "nothing to prepare"
    );

    let mut proc = Proc::spawn(Command::new(&runner).arg(&lib));
    proc.line("ready", |l| l == "ready");
    let lib_arg = lib.display().to_string();
    // Every round rewrites the whole file under the running process.
    for round in 0..20 {
        let run = hotpatch(&["prepare", &lib_arg, "-o", &lib_arg]);
        assert_eq!(run.code(), 0, "round {round}: {}", run.stderr);
        assert!(proc.alive(), "the process running lib.so died in round {round}");
    }
    proc.send("5");
    assert_eq!(proc.line("an answer", |l| l.starts_with("work ")), "work 6");
    assert!(proc.alive());

    assert_eq!(std::fs::read(&lib).expect("read lib.so"), expected);
    let mode = std::fs::metadata(&lib).expect("stat lib.so").permissions().mode();
    assert_eq!(mode & 0o7777, 0o750);
    // Nothing but the files this test made is left in the directory.
    let mut names: Vec<String> = std::fs::read_dir(d)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["copy.so", "expected.so", "lib.c", "lib.so", "runner", "runner.c"]
    );
}

#[test]
fn prepare_refuses_an_output_that_is_not_a_regular_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("lib.c"), LIB_C).expect("write lib.c");
    compile("gcc", &["-O2", "-shared", "-fPIC", "-o", "lib.so", "lib.c"], d);
    let fifo = mkfifo(d, "out");
    let link = d.join("link");
    std::os::unix::fs::symlink(d.join("elsewhere"), &link).expect("symlink");
    for out in [&fifo, &link] {
        let run = hotpatch(&[
            "prepare".to_string(),
            d.join("lib.so").display().to_string(),
            "-o".to_string(),
            out.display().to_string(),
        ]);
        let msg = run.failure();
        assert!(
            msg.contains("not a regular file") && msg.contains(&out.display().to_string()),
            "{msg}"
        );
    }
    assert!(!d.join("elsewhere").exists());
}
