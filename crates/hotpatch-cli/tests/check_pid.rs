//! `hotpatch check --pid`: a running padded fixture is listed with the load
//! bias `/proc/PID/maps` implies, next to libc.so.6.

mod common;

use common::*;
use hotpatch_testkit::proc::Proc;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Start `path wait` and block until it says `ready` (bounded); the
/// fixture is killed and reaped however the test ends.
fn start_blocking(path: &Path) -> Proc {
    let mut running = Proc::spawn(Command::new(path).arg("wait"));
    running
        .try_line(Duration::from_secs(20), |l| l == "ready")
        .expect("the fixture did not print `ready` within 20 s");
    running
}

/// Lowest start address of `path`'s mappings, from `/proc/PID/maps`.
fn lowest_mapping(pid: u32, path: &str) -> u64 {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    maps.lines()
        .filter(|l| l.split_whitespace().nth(5) == Some(path))
        .map(|l| u64::from_str_radix(l.split('-').next().unwrap(), 16).unwrap())
        .min()
        .unwrap_or_else(|| panic!("{path} is not mapped:\n{maps}"))
}

fn image_named(doc: &Value, pred: impl Fn(&str) -> bool) -> &Value {
    let hits: Vec<&Value> = doc["images"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| pred(i["path"].as_str().unwrap()))
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "images: {:?}",
        doc["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| &i["path"])
            .collect::<Vec<_>>()
    );
    hits[0]
}

fn check_running(b: CBuild) {
    let dir = tempfile::tempdir().unwrap();
    let path = b.compile(dir.path()).canonicalize().unwrap();
    let file = check_file(&path, true);
    let running = start_blocking(&path);
    let pid = running.child.id();

    let doc: Value = serde_json::from_str(&stdout_of(hotpatch().args([
        "check",
        "--pid",
        &pid.to_string(),
        "--json",
        "--functions",
    ])))
    .unwrap();
    assert_eq!(doc["pid"], pid);

    // The executable, with the bias maps imply.
    let exe = path.to_str().unwrap();
    let main = image_named(&doc, |p| p == exe);
    let link_base = loads(&path).iter().map(|l| l.vaddr & !0xfff).min().unwrap();
    if b.pie {
        assert_eq!(link_base, 0);
    }
    let bias = lowest_mapping(pid, exe) - link_base;
    assert_eq!(num(main, "load_bias"), bias);
    if !b.pie {
        assert_eq!(bias, 0, "a non-PIE executable runs at its link address");
    }
    assert_eq!(main["summary"], file["summary"]);
    assert_eq!(
        num(&main["summary"], "prepared"),
        patchable_sites(&path).len() as u64
    );
    assert_eq!(main["functions"], file["functions"]);

    // libc, also with its bias from maps (its link base is 0).
    let libc = image_named(&doc, |p| p.ends_with("/libc.so.6"));
    let libc_path = libc["path"].as_str().unwrap();
    assert_eq!(num(libc, "load_bias"), lowest_mapping(pid, libc_path));
    assert_eq!(libc["kind"], "shared-library");
    assert!(
        doc["images"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["path"].as_str().unwrap().contains("ld-linux-x86-64"))
    );
    drop(running);
}

#[test]
fn check_pid_gcc_pie() {
    check_running(CBuild::new(Cc::Gcc, Some((8, 6)), true, true));
}

#[test]
fn check_pid_clang_nopie() {
    check_running(CBuild::new(Cc::Clang, Some((8, 6)), false, false));
}
