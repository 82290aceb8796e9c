//! `hotpatch build` on real upstream fixes of zlib, applied to a running
//! program that uses the library.
//!
//! zlib 1.2.11 is the copy bundled in the `libz-sys` 1.1.12 crate (a
//! dev-dependency, so cargo fetches it), built with its own `./configure &&
//! make` into `libz.so.1.2.11`. A program (`tests/build/zlib/user.c`) links
//! it and round-trips buffers from four threads, checking each. Three fixes
//! from zlib's history (`tests/build/zlib/*.diff`, as upstream committed
//! them) are each built into a patch with `hotpatch build` and applied in
//! turn to the one running program:
//!
//! - c376a41 `deflateEnd()` after a raw `deflateInit2()`: `Z_DATA_ERROR`
//!   before, `Z_OK` after (changes `deflateResetKeep` and `deflate`);
//! - eff308a, CVE-2022-37434: `inflate()` copies a gzip extra field past the
//!   buffer `inflateGetHeader()` gave it; a child that triggers it dies of
//!   SIGSEGV before and exits cleanly after;
//! - 8ba393e `deflate_stored()` (a static function) when the window is full.
//!
//! Every round trip stays correct throughout; the patched program answers
//! every probe and a corpus (the compressed bytes at every level, strategy
//! and format) exactly as the same program linked with the fixed release
//! (the three diffs applied and built); `revert --all` brings the old
//! behaviour back.

#[path = "common/live.rs"]
mod live;

use live::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const USER_C: &str = include_str!("build/zlib/user.c");
const FIX_RAW_END: &str = include_str!("build/zlib/c376a41.diff");
const FIX_CVE_2022_37434: &str = include_str!("build/zlib/eff308a.diff");
const FIX_STORED: &str = include_str!("build/zlib/8ba393e.diff");
const BUILD: &str = "./configure >/dev/null && make -s libz.so.1.2.11";

/// zlib 1.2.11 from the libz-sys crate in cargo's registry.
fn zlib_source() -> PathBuf {
    registry_source("libz-sys-1.1.12/src/zlib", "zlib.h")
}

fn build_fix(src: &Path, dir: &Path, name: &str, diff_text: &str) -> (PathBuf, Value) {
    let diff = dir.join(format!("{name}.diff"));
    std::fs::write(&diff, diff_text).expect("write diff");
    let patch = dir.join(format!("{name}.so"));
    let run = hotpatch_build(
        src,
        &diff,
        BUILD,
        &src.join("libz.so.1.2.11"),
        &patch,
        Duration::from_secs(300),
    );
    assert_eq!(run.code(), 0, "hotpatch build {name}: {}", run.stderr);
    (patch, run.json())
}

fn replaced(report: &Value) -> Vec<String> {
    report["functions"]
        .as_array()
        .expect("functions")
        .iter()
        .filter(|f| f["replaced"] == true)
        .filter_map(|f| f["name"].as_str().map(str::to_string))
        .collect()
}

fn ask(p: &mut Proc, command: &str) -> String {
    p.send(command);
    let line = p.line(command, |l| l.starts_with(command));
    line[command.len()..].trim().to_string()
}

/// (round trips so far, wrong ones).
fn stats(p: &mut Proc) -> (u64, u64) {
    let s = format!(" {}", ask(p, "stats"));
    (num_field(&s, "ok=") as u64, num_field(&s, "bad=") as u64)
}

#[test]
fn three_upstream_zlib_fixes_built_and_applied_to_a_running_user_of_the_library() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("zlib");
    sh(
        dir.path(),
        &format!("cp -a {} {}", zlib_source().display(), src.display()),
    );
    sh(
        &src,
        "chmod -R u+w . && ./configure >/dev/null && make -s libz.so.1.2.11",
    );
    std::fs::write(dir.path().join("user.c"), USER_C).expect("write user.c");
    sh(
        dir.path(),
        &format!(
            "gcc -O2 -pthread -I{z} -o user user.c {z}/libz.so.1.2.11 -Wl,-rpath,{z}",
            z = src.display()
        ),
    );

    // deflate_stored is static and deflate() calls it directly: zlib is
    // built without padding, so deflate is replaced with it (and the apply
    // acknowledges the direct call that calls in progress may still make).
    let (stored, report) = build_fix(&src, dir.path(), "8ba393e", FIX_STORED);
    assert_eq!(
        replaced(&report),
        vec!["deflate.c:deflate_stored", "deflate"],
        "{report:#}"
    );
    let (raw_end, report) = build_fix(&src, dir.path(), "c376a41", FIX_RAW_END);
    assert_eq!(
        replaced(&report),
        vec!["deflateResetKeep", "deflate"],
        "{report:#}"
    );
    let (cve, report) = build_fix(&src, dir.path(), "eff308a", FIX_CVE_2022_37434);
    assert_eq!(replaced(&report), vec!["inflate"], "{report:#}");

    // The fixed release, and what the program answers with it.
    let fixed = dir.path().join("zlib-fixed");
    sh(
        dir.path(),
        &format!("cp -a {} {}", src.display(), fixed.display()),
    );
    for diff in [FIX_STORED, FIX_RAW_END, FIX_CVE_2022_37434] {
        std::fs::write(dir.path().join("one.diff"), diff).expect("write diff");
        sh(
            &fixed,
            "make -s distclean >/dev/null 2>&1; patch -s -p1 --batch -i ../one.diff",
        );
    }
    sh(&fixed, BUILD);
    sh(
        dir.path(),
        &format!(
            "gcc -O2 -pthread -I{z} -o user-fixed user.c {z}/libz.so.1.2.11 -Wl,-rpath,{z}",
            z = fixed.display()
        ),
    );
    let probes = ["corpus", "rawend", "extra", "stored"];
    let mut release = Proc::spawn(&mut Command::new(dir.path().join("user-fixed")));
    release.line("ready", |l| l == "ready");
    let expected: Vec<String> = probes.iter().map(|c| ask(&mut release, c)).collect();
    drop(release);

    let mut p = Proc::spawn(&mut Command::new(dir.path().join("user")));
    p.line("ready", |l| l == "ready");
    assert_eq!(ask(&mut p, "rawend"), "-3", "Z_DATA_ERROR before the fix");
    assert_eq!(
        ask(&mut p, "extra"),
        "exit=-1 signal=11",
        "the CVE's wild copy before the fix"
    );
    assert_eq!(ask(&mut p, "stored"), "ok=1");

    // The stored fix first: c376a41's deflate then supersedes its deflate
    // and calls deflate_stored through its entry, which runs the fixed one.
    for (patch, extra) in [
        (&stored, &["--allow-direct-calls"][..]),
        (&raw_end, &[]),
        (&cve, &[]),
    ] {
        apply(p.pid(), patch, extra);
        let (ok, bad) = stats(&mut p);
        assert_eq!(bad, 0, "a wrong round trip after applying {}", patch.display());
        assert!(ok > 0);
    }
    assert_eq!(ask(&mut p, "rawend"), "0", "Z_OK with c376a41");
    assert_eq!(
        ask(&mut p, "extra"),
        "exit=0 signal=0",
        "no wild copy with eff308a"
    );
    let answers: Vec<String> = probes.iter().map(|c| ask(&mut p, c)).collect();
    assert_eq!(
        answers, expected,
        "the patched program answers {probes:?} as the fixed release does"
    );
    let (before, _) = stats(&mut p);
    let moving = std::time::Instant::now();
    while stats(&mut p).0 < before + 100 {
        assert!(moving.elapsed() < WAIT, "the workers stopped");
        std::thread::sleep(Duration::from_millis(20));
    }

    let reverted = revert(p.pid(), None);
    assert_eq!(reverted.as_array().map(Vec::len), Some(3), "{reverted}");
    assert_eq!(ask(&mut p, "rawend"), "-3");
    assert_eq!(ask(&mut p, "extra"), "exit=-1 signal=11");
    assert_eq!(stats(&mut p).1, 0);
}
