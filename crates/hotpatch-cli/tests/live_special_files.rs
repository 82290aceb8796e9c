//! Fifos and devices are never read as images or patches: a fifo given to
//! `apply`, `check` or `prepare` is refused at once, naming it; a process
//! that maps `/dev/zero` (the device, and a 2 GiB shared mapping that
//! reads as a file of zeros) is checked and patched without reading it —
//! the tool runs with its address space capped at 1 GiB, so reading that
//! mapping whole would fail.

#[path = "common/live.rs"]
mod live;

use live::*;
use std::process::Command;
use std::time::Duration;

/// How long any of these may take before the test kills the tool and fails.
const LIMIT: Duration = Duration::from_secs(20);

/// The address-space cap the tool runs under in these tests.
const ADDRESS_SPACE: &str = "--as=1073741824";

/// `prlimit --as=1GiB hotpatch ARGS`, killed (and failing) after [`LIMIT`].
fn capped_hotpatch(args: &[&str]) -> Run {
    let mut cmd = Command::new("prlimit");
    cmd.arg(ADDRESS_SPACE)
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_hotpatch"))
        .args(args)
        .env_remove("HOTPATCH_LOG")
        .env_remove("RUST_LOG");
    run_within(LIMIT, &mut cmd)
}

#[test]
fn a_fifo_is_refused_promptly_by_apply_check_and_prepare() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let fifo = mkfifo(d, "patch.so");
    let fifo_arg = fifo.display().to_string();
    let exe = build_target(d, "gcc", "target", TARGET_C, &[]);
    let target = Target::start(&exe, 1, None, Workers::Idle);
    let pid = target.pid().to_string();
    let out = d.join("out");
    let out_arg = out.display().to_string();
    for args in [
        vec!["apply", &pid, &fifo_arg],
        vec!["check", &fifo_arg],
        vec!["check", &fifo_arg, "--json", "--functions"],
        vec!["prepare", &fifo_arg, "-o", &out_arg],
    ] {
        let run = hotpatch_within(LIMIT, &args);
        let msg = run.failure();
        assert!(msg.contains(&fifo_arg) && msg.contains("fifo"), "{args:?}: {msg}");
    }
    assert!(!out.exists(), "prepare wrote its output from a fifo");
    assert!(
        !maps(target.pid()).contains("hotpatch"),
        "apply touched the target"
    );
}

#[test]
fn a_process_mapping_dev_zero_is_checked_and_patched_without_reading_it() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let exe = build_target(d, "gcc", "zero", include_str!("live/maps_dev_zero.c"), &[]);
    let patch = build_patch(
        d,
        "fix",
        "#include \"hotpatch.h\"\nlong f_fix(long x) { return x * 5 + 2; }\nHOTPATCH_REPLACE(f, f_fix);\n",
    );
    let mut proc = Proc::spawn(&mut Command::new(&exe));
    proc.line("ready", |l| l == "ready");
    let pid = proc.pid().to_string();
    let zero_maps = maps(proc.pid())
        .lines()
        .filter(|l| l.contains("/dev/zero"))
        .count();
    assert_eq!(zero_maps, 3, "{}", maps(proc.pid()));

    let run = capped_hotpatch(&["check", "--pid", &pid, "--json"]);
    assert_eq!(run.status.code(), Some(0), "{run:?}");
    let doc: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON");
    let skipped = doc["skipped"].as_array().expect("skipped[]");
    assert!(
        skipped.iter().filter(|s| s["path"] == "/dev/zero").count() >= 2,
        "{skipped:?}"
    );
    let images = doc["images"].as_array().expect("images[]");
    assert!(
        images
            .iter()
            .any(|i| i["path"].as_str().is_some_and(|p| p.ends_with("/zero")))
    );

    let run = capped_hotpatch(&["apply", &pid, &patch.display().to_string()]);
    assert_eq!(run.status.code(), Some(0), "{run:?}");
    proc.send("10");
    assert_eq!(proc.line("an answer", |l| l.starts_with("f ")), "f 52");
    assert!(proc.alive());
}
