//! `hotpatch build` on a real upstream fix of lz4 that changes a static
//! function the compiler inlines into its callers, applied to a running
//! program that uses the library.
//!
//! lz4 1.9.2 is the copy bundled in the `lz4-sys` 1.9.3 crate (a
//! dev-dependency, so cargo fetches it), built with its own `lib/Makefile`
//! into `liblz4.so.1.9.2`, with `-O2 -g`. (Its `LZ4F_compressFrame` has a
//! backward jump that gas encodes in 5 bytes when all functions share one
//! section and in 2 with function sections: the builder proves the rebuild
//! on the build's own objects, compiled as given, and compares the two
//! builds on copies compiled with sections.)
//!
//! The fix is lz4 commit 8301a21 (CVE-2021-3520,
//! `tests/build/lz4/8301a21.diff` as upstream committed it): the static,
//! always-inline `LZ4_decompress_generic` now rejects a negative capacity.
//! The source of no exported function changes, yet every decompression
//! entry point the check was inlined into changes; the report names
//! `LZ4_decompress_generic` in their `inlines_edited`, and the callers of
//! the replaced statics are replaced too (the library is built without
//! padding). A program (`tests/build/lz4/user.c`) compresses and
//! decompresses from four threads, checking each round trip; before the fix
//! `LZ4_decompress_safe()` with capacity -1 returns -2 and
//! `LZ4_decompress_safe_partial()` writes hundreds of bytes around its
//! buffer; patched, both return -1 and write nothing, every round trip stays
//! correct, and the program answers its probes and a corpus exactly as the
//! same program linked with the fixed release; `revert` brings the old
//! behaviour back.

#[path = "common/live.rs"]
mod live;

use live::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const USER_C: &str = include_str!("build/lz4/user.c");
const FIX_NEGATIVE_CAPACITY: &str = include_str!("build/lz4/8301a21.diff");
const BUILD: &str = "make -s -B -C lib liblz4 CFLAGS='-O2 -g' >/dev/null";
const LIBRARY: &str = "lib/liblz4.so.1.9.2";

fn build_fix(src: &Path, dir: &Path) -> (PathBuf, Value) {
    let diff = dir.join("8301a21.diff");
    std::fs::write(&diff, FIX_NEGATIVE_CAPACITY).expect("write diff");
    let patch = dir.join("8301a21.so");
    let run = hotpatch_build(
        src,
        &diff,
        BUILD,
        &src.join(LIBRARY),
        &patch,
        Duration::from_secs(300),
    );
    assert_eq!(run.code(), 0, "hotpatch build 8301a21: {}", run.stderr);
    (patch, run.json())
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

fn build_user(dir: &Path, name: &str, lib: &Path) {
    sh(
        dir,
        &format!(
            "gcc -O2 -pthread -I{l} -o {name} user.c {l}/liblz4.so.1.9.2 -Wl,-rpath,{l}",
            l = lib.display()
        ),
    );
}

#[test]
fn an_upstream_lz4_fix_of_an_inlined_static_built_and_applied_to_a_running_user_of_the_library() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("lz4");
    let bundled = registry_source("lz4-sys-1.9.3/liblz4", "lib/lz4.c");
    sh(
        dir.path(),
        &format!("cp -a {} {}", bundled.display(), src.display()),
    );
    sh(&src, &format!("chmod -R u+w . && {BUILD}"));
    std::fs::write(dir.path().join("user.c"), USER_C).expect("write user.c");
    build_user(dir.path(), "user", &src.join("lib"));

    let (patch, report) = build_fix(&src, dir.path());
    let functions = report["functions"].as_array().expect("functions");
    let replaced: Vec<&str> = functions
        .iter()
        .filter(|f| f["replaced"] == true)
        .filter_map(|f| f["name"].as_str())
        .collect();
    for name in [
        "LZ4_decompress_safe",
        "LZ4_decompress_safe_partial",
        "LZ4_decompress_safe_continue",
        "LZ4_decompress_safe_forceExtDict",
        "lz4.c:LZ4_decompress_safe_withSmallPrefix",
        "LZ4_decompress_safe_usingDict",
    ] {
        assert!(replaced.contains(&name), "{name} not replaced: {report:#}");
    }
    // The edit is in the inlined static only: no function's own lines
    // changed, and each changed one names the static it inlined.
    for f in functions {
        assert_eq!(f["source_edited"], false, "{f}");
        let inlines: Vec<&str> = f["inlines_edited"]
            .as_array()
            .expect("inlines_edited (the build has -g)")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let changed = f["reasons"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["reason"] == "changed"));
        if changed {
            assert_eq!(inlines, ["LZ4_decompress_generic"], "{f}");
        }
    }
    for name in ["LZ4_decompress_safe", "LZ4_decompress_safe_partial"] {
        let f = functions.iter().find(|f| f["name"] == name).expect("listed");
        assert_eq!(
            f["inlines_edited"],
            serde_json::json!(["LZ4_decompress_generic"]),
            "{f}"
        );
    }
    assert!(
        !replaced.iter().any(|n| n.contains("LZ4_decompress_generic")),
        "the inlined static has no copy of its own to replace: {report:#}"
    );

    // The fixed release, and what the program answers with it.
    let fixed = dir.path().join("lz4-fixed");
    sh(
        dir.path(),
        &format!("cp -a {} {}", src.display(), fixed.display()),
    );
    sh(&fixed, "patch -s -p1 --batch -i ../8301a21.diff");
    sh(&fixed, BUILD);
    build_user(dir.path(), "user-fixed", &fixed.join("lib"));
    let probes = ["safe", "partial", "corpus"];
    let mut release = Proc::spawn(&mut Command::new(dir.path().join("user-fixed")));
    release.line("ready", |l| l == "ready");
    let expected: Vec<String> = probes.iter().map(|c| ask(&mut release, c)).collect();
    drop(release);
    assert_eq!(expected[..2], ["-1", "exit=0 signal=0"]);

    let mut p = Proc::spawn(&mut Command::new(dir.path().join("user")));
    p.line("ready", |l| l == "ready");
    assert_eq!(
        ask(&mut p, "safe"),
        "-2",
        "an error past the input before the fix"
    );
    let partial = ask(&mut p, "partial");
    assert_ne!(
        partial, "exit=0 signal=0",
        "a write around the buffer before the fix"
    );
    let original_corpus = ask(&mut p, "corpus");
    assert_ne!(original_corpus, expected[2]);

    // The replaced statics are called directly by code of the unpadded
    // library: the apply acknowledges it.
    apply(p.pid(), &patch, &["--allow-direct-calls"]);
    let (ok, bad) = stats(&mut p);
    assert_eq!(bad, 0, "a wrong round trip after applying the fix");
    assert!(ok > 0);
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
    assert_eq!(stats(&mut p).1, 0);

    let reverted = revert(p.pid(), None);
    assert_eq!(reverted.as_array().map(Vec::len), Some(1), "{reverted}");
    assert_eq!(ask(&mut p, "safe"), "-2");
    assert_eq!(ask(&mut p, "partial"), partial);
    assert_eq!(ask(&mut p, "corpus"), original_corpus);
    assert_eq!(stats(&mut p).1, 0);
}
