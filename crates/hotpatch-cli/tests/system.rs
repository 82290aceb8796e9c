//! `hotpatch check` on the system's own libraries: no padding anywhere,
//! function counts as `readelf` sees them, and most functions detourable.

mod common;

use common::*;
use std::path::Path;

fn check_system_library(path: &Path, min_detourable_percent: u64) {
    if !path.exists() {
        panic!(
            "{} is missing; this test expects Debian 12 x86-64",
            path.display()
        );
    }
    let image = check_file(path, true);
    assert_summary_consistent(&image);
    assert_eq!(image["kind"], "shared-library");
    let expected = expected_functions(path);
    let s = &image["summary"];
    assert_eq!(num(s, "functions"), expected.len() as u64);
    assert_eq!(num(s, "prepared"), 0);
    assert_eq!(num(&image, "padded_sites"), 0);
    let detourable = num(s, "detourable");
    assert!(
        detourable * 100 > num(s, "functions") * min_detourable_percent,
        "{}: only {detourable} of {} functions detourable",
        path.display(),
        num(s, "functions")
    );
    // IFUNC resolvers, exactly as readelf lists them (an address with only
    // IFUNC symbols).
    let ifuncs = expected
        .values()
        .filter(|syms| syms.iter().all(|s| s.kind == "IFUNC"))
        .count() as u64;
    let resolvers = s["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["reason"] == "ifunc-resolver")
        .map_or(0, |r| num(r, "count"));
    assert_eq!(resolvers, ifuncs);
    // The build-id readelf -n prints.
    let notes = stdout_of(std::process::Command::new("readelf").arg("-n").arg(path));
    let build_id = notes
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .expect("a build-id note");
    assert_eq!(image["build_id"], build_id);
}

#[test]
fn libc() {
    // `readelf -sW` prints .dynsym (libc.so.6 ships without .symtab).
    check_system_library(Path::new("/usr/lib/x86_64-linux-gnu/libc.so.6"), 80);
}

#[test]
fn libstdcxx() {
    check_system_library(Path::new("/usr/lib/x86_64-linux-gnu/libstdc++.so.6"), 80);
}
