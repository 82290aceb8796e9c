//! `hotpatch build` on a small make project (`tests/build/counter`): a
//! counter with static state, a static function inlined into its caller and
//! one that is not, four threads calling it.
//!
//! - A fix to the inlined static replaces its caller; the patch's code
//!   updates the program's own statics (bound, not copied): the program's
//!   unpatched reader sees the count go on from where it was.
//! - A fix to the non-inlined static replaces it by its `file.c:name`.
//! - Refused, with nothing written: a changed initial value of a static; a
//!   binary built with other flags than the build command.

#[path = "common/live.rs"]
mod live;

use live::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const PROJECT: &[(&str, &str)] = &[
    ("Makefile", include_str!("build/counter/Makefile")),
    ("counter.c", include_str!("build/counter/counter.c")),
    ("counter.h", include_str!("build/counter/counter.h")),
    ("main.c", include_str!("build/counter/main.c")),
];

/// The project in `dir/src`, built with `make ARGS`.
fn project(dir: &Path, make_args: &[&str]) -> PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).expect("mkdir src");
    for (name, text) in PROJECT {
        std::fs::write(src.join(name), text).expect("write project");
    }
    let out = Command::new("make")
        .args(["-s"])
        .args(make_args)
        .current_dir(&src)
        .output()
        .expect("run make");
    assert!(
        out.status.success(),
        "make: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    src
}

/// A unified diff that turns `from` into `to` in `file` of the project.
fn fix(dir: &Path, file: &str, from: &str, to: &str) -> PathBuf {
    let old = PROJECT.iter().find(|(n, _)| *n == file).expect("project file").1;
    diff_of(dir, file, old, from, to)
}

/// `dir/fix.diff`: a unified diff that turns the first `from` of `old` (the
/// text of `file`, its path in the tree) into `to`.
fn diff_of(dir: &Path, file: &str, old: &str, from: &str, to: &str) -> PathBuf {
    assert!(old.contains(from), "{from:?} not in {file}");
    let new = old.replacen(from, to, 1);
    let (a, b) = (dir.join("old"), dir.join("new"));
    std::fs::write(&a, old).expect("write old");
    std::fs::write(&b, new).expect("write new");
    let out = Command::new("diff")
        .args([
            "-u",
            "--label",
            &format!("a/{file}"),
            "--label",
            &format!("b/{file}"),
        ])
        .arg(&a)
        .arg(&b)
        .output()
        .expect("run diff");
    let diff = dir.join("fix.diff");
    std::fs::write(&diff, out.stdout).expect("write diff");
    diff
}

fn build(src: &Path, diff: &Path, out: &Path) -> Run {
    build_with(src, diff, out, &[])
}

/// `hotpatch build` with `make -s MAKE_ARGS…` as the build command.
fn build_with(src: &Path, diff: &Path, out: &Path, make_args: &[&str]) -> Run {
    let command: String = std::iter::once("make -s".to_string())
        .chain(make_args.iter().map(|a| format!("'{a}'")))
        .collect::<Vec<_>>()
        .join(" ");
    hotpatch_build(
        src,
        diff,
        &command,
        &src.join("prog"),
        out,
        std::time::Duration::from_secs(120),
    )
}

fn start(src: &Path) -> Proc {
    let mut p = Proc::spawn(&mut Command::new(src.join("prog")));
    p.line("ready", |l| l == "ready");
    p
}

/// What one `add(1)` adds now.
fn step(p: &mut Proc) -> i64 {
    p.send("step");
    let line = p.line("step", |l| l.starts_with("step "));
    line["step ".len()..].parse().expect("step value")
}

/// The program's own total, read by its unpatched `total_now`.
fn total(p: &mut Proc) -> i64 {
    p.send("total");
    let line = p.line("total", |l| l.starts_with("total "));
    line["total ".len()..].parse().expect("total value")
}

fn names(report: &Value, key: &str, field: &str) -> Vec<String> {
    report[key]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v[field].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_fix_to_an_inlined_static_replaces_its_caller_and_binds_the_programs_statics() {
    inlined_static("cc");
}

#[test]
fn the_same_with_clang() {
    inlined_static("clang");
}

fn inlined_static(cc: &str) {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let compiler = format!("CC={cc}");
    let src = project(dir.path(), &[&compiler]);
    let diff = fix(dir.path(), "counter.c", "return x * 2;", "return x * 3;");
    let patch = dir.path().join("fix.so");
    let run = build_with(&src, &diff, &patch, &[&compiler]);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    let report = run.json();
    assert_eq!(names(&report, "functions", "name"), vec!["add"], "{report:#}");
    assert_eq!(report["functions"][0]["replaced"], true);
    // The fix edits `scale`; the compiler inlined it into `add`.
    assert_eq!(
        report["functions"][0]["inlines_edited"],
        serde_json::json!(["scale"])
    );
    assert_eq!(report["functions"][0]["source_edited"], false);
    let bound = names(&report, "bindings", "symbol");
    for statik in [
        "counter.c:lock",
        "counter.c:total",
        "counter.c:calls",
        "counter.c:weigh",
    ] {
        assert!(bound.iter().any(|b| b == statik), "{statik} not bound: {bound:?}");
    }

    let mut p = start(&src);
    assert_eq!(step(&mut p), 2);
    let before = total(&mut p);
    apply(p.pid(), &patch, &[]);
    assert_eq!(step(&mut p), 3);
    // The workers' patched adds go to the program's own total, which the
    // unpatched total_now reads: it goes on from where it was.
    let after = total(&mut p);
    assert!(after > before, "total went from {before} to {after}");
    let later = wait_for(|| {
        let t = total(&mut p);
        (t > after + 30).then_some(t)
    });
    assert!(later > after);
    revert(p.pid(), None);
    assert_eq!(step(&mut p), 2);
    assert!(p.alive());
}

#[test]
fn a_fix_to_a_static_that_is_not_inlined_replaces_it_by_file_and_name() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = project(dir.path(), &[]);
    let diff = fix(
        dir.path(),
        "counter.c",
        "return x + (weighed < 0);",
        "return x + 1 + (weighed < 0);",
    );
    let patch = dir.path().join("fix.so");
    let run = build(&src, &diff, &patch);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    let report = run.json();
    assert_eq!(
        names(&report, "functions", "name"),
        vec!["counter.c:weigh"],
        "{report:#}"
    );
    let bound = names(&report, "bindings", "symbol");
    assert!(bound.iter().any(|b| b == "counter.c:weighed.0"), "{bound:?}");

    let mut p = start(&src);
    assert_eq!(step(&mut p), 2);
    apply(p.pid(), &patch, &[]);
    assert_eq!(step(&mut p), 3);
    revert(p.pid(), None);
    assert_eq!(step(&mut p), 2);
}

#[test]
fn a_changed_initial_value_of_a_static_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = project(dir.path(), &[]);
    let diff = fix(
        dir.path(),
        "counter.c",
        "static long total;",
        "static long total = 5;",
    );
    let patch = dir.path().join("fix.so");
    let run = build(&src, &diff, &patch);
    assert_eq!(run.code(), 1, "{}", run.stdout);
    let err = error_lines(&run.stderr);
    assert!(
        err.contains("counter.c:total") && err.contains("changed data"),
        "{err}"
    );
    assert!(!patch.exists());
}

#[test]
fn a_binary_built_with_other_flags_is_not_the_rebuild() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = project(dir.path(), &["CFLAGS=-O1 -g -fpatchable-function-entry=8,6"]);
    let diff = fix(dir.path(), "counter.c", "return x * 2;", "return x * 3;");
    let patch = dir.path().join("fix.so");
    let run = build(&src, &diff, &patch);
    assert_eq!(run.code(), 1, "{}", run.stdout);
    let err = error_lines(&run.stderr);
    assert!(err.contains("the original rebuild is not"), "{err}");
    assert!(!patch.exists());
}

#[test]
fn a_diff_that_does_not_apply_is_an_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = project(dir.path(), &[]);
    let diff = fix(dir.path(), "counter.c", "return x * 2;", "return x * 3;");
    let text = std::fs::read_to_string(&diff)
        .expect("diff")
        .replace("x * 2", "x * 7");
    std::fs::write(&diff, text).expect("diff");
    let run = build(&src, &diff, &dir.path().join("fix.so"));
    assert_eq!(run.code(), 1);
    assert!(
        error_lines(&run.stderr).contains("does not apply"),
        "{}",
        run.stderr
    );
}

/// Poll `f` until it gives a value (bounded).
fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let started = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(started.elapsed() < WAIT, "condition not met within {WAIT:?}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// `hotpatch build` of `from` → `to` in counter.c must be refused, naming
/// `symbol` and saying `why`; nothing is written.
fn refused(make_args: &[&str], from: &str, to: &str, symbol: &str, why: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = project(dir.path(), make_args);
    let diff = fix(dir.path(), "counter.c", from, to);
    let patch = dir.path().join("fix.so");
    let run = build_with(&src, &diff, &patch, make_args);
    assert_eq!(run.code(), 1, "{}", run.stdout);
    let err = error_lines(&run.stderr);
    assert!(
        err.contains(symbol) && err.contains(why),
        "expected {symbol}: {why}, got {err}"
    );
    assert!(!patch.exists());
}

#[test]
fn a_changed_initial_value_of_a_static_local_is_refused() {
    refused(
        &[],
        "static long weighed;",
        "static long weighed = 1;",
        "counter.c:weighed.0",
        "changed data",
    );
}

#[test]
fn a_changed_thread_local_is_refused() {
    refused(
        &[],
        "static __thread long per_thread;",
        "static __thread long per_thread = 7;",
        "counter.c:per_thread",
        "changed thread-local",
    );
}

#[test]
fn a_new_thread_local_is_refused() {
    refused(
        &[],
        "return ++per_thread + started;",
        "static __thread long more; return ++per_thread + started + ++more;",
        "more",
        "new thread-local",
    );
}

#[test]
fn a_changed_constructor_is_refused() {
    refused(
        &[],
        "started = 1;",
        "started = 2;",
        "counter.c:start",
        "a constructor",
    );
}

#[test]
fn a_changed_function_too_small_to_patch_is_refused() {
    // Without padding, `zero` is 3 bytes: no room for a jump.
    refused(
        &["CFLAGS=-O2 -g"],
        "return 0;",
        "return 1;",
        "- zero:",
        "cannot patch it",
    );
}

#[test]
fn a_cpp_fix_to_a_member_function_with_an_inlined_helper() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir src");
    for (name, text) in [
        ("Makefile", include_str!("build/cpp/Makefile")),
        ("counter.h", include_str!("build/cpp/counter.h")),
        ("counter.cc", include_str!("build/cpp/counter.cc")),
        ("main.cc", include_str!("build/cpp/main.cc")),
    ] {
        std::fs::write(src.join(name), text).expect("write project");
    }
    let out = Command::new("make")
        .arg("-s")
        .current_dir(&src)
        .output()
        .expect("make");
    assert!(
        out.status.success(),
        "make: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let diff = diff_of(
        dir.path(),
        "counter.cc",
        include_str!("build/cpp/counter.cc"),
        "return x * 2;",
        "return x * 3;",
    );
    let patch = dir.path().join("fix.so");
    let run = build(&src, &diff, &patch);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    let report = run.json();
    assert_eq!(
        names(&report, "functions", "name")[0],
        "_ZN7Counter3addEi",
        "{report:#}"
    );
    assert_eq!(
        report["functions"][0]["inlines_edited"],
        serde_json::json!(["scale"])
    );

    let mut p = start(&src);
    assert_eq!(step(&mut p), 2);
    apply(p.pid(), &patch, &[]);
    assert_eq!(step(&mut p), 3);
    p.send("label");
    let label = p.line("label", |l| l.starts_with("counter:"));
    assert!(label["counter:".len()..].parse::<i64>().is_ok(), "{label}");
    revert(p.pid(), None);
    assert_eq!(step(&mut p), 2);
}

#[test]
fn a_rust_fix_built_with_cargo() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("src")).expect("mkdir src");
    std::fs::write(src.join("Cargo.toml"), include_str!("build/rust/Cargo.toml.in")).expect("Cargo.toml");
    let main = include_str!("build/rust/src/main.rs");
    std::fs::write(src.join("src/main.rs"), main).expect("main.rs");
    let cargo = || {
        let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        // The outer `cargo test`'s settings are not this build's.
        c.env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS");
        c
    };
    let out = cargo()
        .args(["build", "--release", "--offline", "-q"])
        .current_dir(&src)
        .output()
        .expect("cargo build");
    assert!(
        out.status.success(),
        "cargo build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let diff = diff_of(dir.path(), "src/main.rs", main, "    x * 2\n", "    x * 3\n");
    let patch = dir.path().join("fix.so");
    let binary = src.join("target/release/counter");
    let run = hotpatch_build(
        &src,
        &diff,
        "cargo build --release --offline -q",
        &binary,
        &patch,
        std::time::Duration::from_secs(300),
    );
    assert_eq!(run.code(), 0, "{}", run.stderr);
    let report = run.json();
    // `scale`, and any caller LLVM compiled differently knowing the new one.
    let replaced = names(&report, "functions", "name");
    assert!(
        replaced.iter().any(|n| n.starts_with("_ZN7counter5scale17h")),
        "{report:#}"
    );

    let mut p = Proc::spawn(&mut Command::new(&binary));
    p.line("ready", |l| l == "ready");
    assert_eq!(step(&mut p), 2);
    // Not prepared, and called directly: LLVM allocates no registers
    // across calls, so the direct call is safe to acknowledge.
    apply(p.pid(), &patch, &["--allow-direct-calls"]);
    assert_eq!(step(&mut p), 3);
    let before = total(&mut p);
    let later = wait_for(|| {
        let t = total(&mut p);
        (t > before + 30).then_some(t)
    });
    assert!(later > before, "the program's own TOTAL moves on");
    revert(p.pid(), None);
    assert_eq!(step(&mut p), 2);
}

#[test]
fn a_fix_adding_a_static_carries_it_at_its_initial_value() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = project(dir.path(), &[]);
    let diff = fix(
        dir.path(),
        "counter.c",
        "long total_now(void)\n{\n",
        "static long added = 40;\n\nlong total_now(void)\n{\n    return added++;\n",
    );
    let patch = dir.path().join("fix.so");
    let run = build(&src, &diff, &patch);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    let report = run.json();
    let carried = report["carried"].to_string();
    assert!(
        carried.contains("counter.c:added (new writable data"),
        "{report:#}"
    );

    let mut p = start(&src);
    apply(p.pid(), &patch, &[]);
    // The new static starts at its initial value and keeps its state.
    assert_eq!(total(&mut p), 40);
    assert_eq!(total(&mut p), 41);
    revert(p.pid(), None);
    assert!(total(&mut p) > 41);
}

#[test]
fn a_changed_struct_layout_is_refused() {
    refused(
        &[],
        "struct stats {\n    long adds;",
        "struct stats {\n    long first;\n    long adds;",
        "type `stats`",
        "changed layout (16 → 24 bytes)",
    );
}
