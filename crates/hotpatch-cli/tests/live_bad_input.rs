//! `hotpatch apply` with bad input: exit code 1 and one line naming what
//! and where, and the target untouched — its code bytes (padding and
//! entry of every function the patch names, read through /proc/PID/mem)
//! are the same before and after, and no patch library or state region
//! was mapped where the error is found before the process is touched.

#[path = "common/live.rs"]
mod live;

use live::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const STATE_MAP: &str = "/memfd:hotpatch-state";

fn apply_run(pid: i32, patch: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["apply".to_string(), pid.to_string(), patch.display().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    hotpatch(&args)
}

/// Apply `patch` to `target`, which must fail with a message containing
/// every one of `names`; nothing in the target changes.
fn refused(target: &mut Target, patch: &Path, names: &[&str]) -> String {
    let pid = target.pid();
    let code = target.code();
    let run = apply_run(pid, patch, &[]);
    let msg = run.failure().to_string();
    for n in names {
        assert!(msg.contains(n), "{msg:?} does not mention {n:?}");
    }
    assert_eq!(
        target.code(),
        code,
        "code bytes changed by a refused apply: {msg}"
    );
    let maps = maps(pid);
    assert!(
        !maps_file(pid, patch),
        "{} is mapped after: {msg}",
        patch.display()
    );
    assert!(!maps.contains(STATE_MAP), "a state region was created for: {msg}");
    assert_eq!(target.version(), (0, 0));
    msg
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

#[test]
fn bad_patches_change_nothing() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let exe = build_target(d, "gcc", "target", TARGET_C, &[]);
    let mut target = Target::start(&exe, 2, None, Workers::Duty);
    let mut messages = Vec::new();

    // Missing file.
    let missing = d.join("no-such-patch.so");
    messages.push(refused(&mut target, &missing, &[missing.to_str().unwrap()]));
    // Not ELF.
    let text = write(d, "notes.so", "this is not a shared library\n");
    messages.push(refused(
        &mut target,
        &text,
        &[text.to_str().unwrap(), "not an ELF"],
    ));
    // A plain .so without records (and no --replace).
    let plain = build_patch(d, "plain", "long f_a(long x) { return x * 5 + 2; }\n");
    messages.push(refused(
        &mut target,
        &plain,
        &[plain.to_str().unwrap(), "not a patch"],
    ));
    // A record naming a function the target does not have.
    let missing_fn = build_patch(
        d,
        "missing_fn",
        "#include \"hotpatch.h\"\nlong f_a(long x) { return x; }\nHOTPATCH_REPLACE(no_such_function, f_a);\n",
    );
    messages.push(refused(&mut target, &missing_fn, &["no_such_function", "target"]));
    // A variable as the replacement target (`workers` is a static int).
    let variable = build_patch(
        d,
        "variable",
        "#include \"hotpatch.h\"\nlong f_a(long x) { return x; }\nHOTPATCH_REPLACE(workers, f_a);\n",
    );
    messages.push(refused(&mut target, &variable, &["`workers`", "variable"]));
    // A replacement the patch does not export.
    let unexported = build_patch(
        d,
        "unexported",
        "#include \"hotpatch.h\"\nstatic long f_a(long x) { return x; }\nHOTPATCH_REPLACE(f, f_a);\nlong keep(long x) { return f_a(x); }\n",
    );
    messages.push(refused(
        &mut target,
        &unexported,
        &["`f_a`", "not an exported function"],
    ));
    // Still fine after all that.
    let s = target.stats();
    assert_eq!(s.bad, 0);
    assert!(target.proc.alive());
    eprintln!("messages:\n  {}", messages.join("\n  "));
}

#[test]
fn ambiguous_static_name() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let exe = build_statics(d);
    let patch = build_patch(
        d,
        "ambiguous",
        "#include \"hotpatch.h\"\nHOTPATCH_POINTER(int, counter);\nlong c2(long x) { return x + *hotpatch_ref_counter; }\nHOTPATCH_REPLACE(compute, c2);\n",
    );
    let mut target = Statics::start(&exe);
    let pid = target.pid();
    let compute = symbol_in_process(pid, &exe, None, "compute");
    let before = code_bytes(pid, compute);
    let run = apply_run(pid, &patch, &[]);
    let msg = run.failure();
    assert!(msg.contains("`counter` is ambiguous"), "{msg}");
    // It says which names would do.
    assert!(
        msg.contains("statics_a.c:counter") && msg.contains("statics_b.c:counter"),
        "{msg}"
    );
    assert_eq!(code_bytes(pid, compute), before);
    assert!(!maps_file(pid, &patch));
    assert!(!maps(pid).contains(STATE_MAP));
    assert_eq!(target.call(1).r, 2);
}

/// Unprepared functions called directly from their own image (the
/// register-allocation hazard): refused without `--allow-direct-calls`,
/// before the process is touched.
#[test]
fn direct_calls_need_the_flag() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let exe = build_unprepared(d, "gcc", "nopad", TARGET_C, &[]);
    let patch = build_patch(d, "patch_a", PATCH_A_C);
    let mut target = Target::start(&exe, 2, None, Workers::Duty);
    // Without padding: read from the entry only.
    let pid = target.pid();
    let before = (read_mem(pid, target.f, 8), read_mem(pid, target.g, 8));
    let run = apply_run(pid, &patch, &[]);
    let msg = run.failure();
    assert!(msg.contains("--allow-direct-calls"), "{msg}");
    assert!(msg.contains("`f` (") && msg.contains("`g` ("), "{msg}");
    assert_eq!((read_mem(pid, target.f, 8), read_mem(pid, target.g, 8)), before);
    assert!(!maps_file(pid, &patch));
    assert!(!maps(pid).contains(STATE_MAP));
    assert_eq!(target.version(), (0, 0));
}

#[test]
fn build_id_mismatch_and_force() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let exe = build_target(d, "clang", "target", TARGET_C, &["-Wl,--build-id=sha1"]);
    let wrong = "00112233445566778899aabbccddeeff00112233";
    let patch = build_patch(
        d,
        "wrong_build",
        &format!("#include \"hotpatch.h\"\nHOTPATCH_TARGET(\"target\", \"{wrong}\");\n{PATCH_A_C}"),
    );
    let mut target = Target::start(&exe, 2, None, Workers::Duty);
    let pid = target.pid();
    let notes = String::from_utf8(
        std::process::Command::new("readelf")
            .arg("-n")
            .arg(&exe)
            .output()
            .expect("readelf -n")
            .stdout,
    )
    .unwrap();
    let actual = notes
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .expect("a build-id")
        .to_string();
    let msg = refused(&mut target, &patch, &[wrong, &actual, "--force"]);
    eprintln!("{msg}");
    // --force applies it anyway.
    let applied = apply(pid, &patch, &["--force"]);
    assert_eq!(applied["functions"].as_array().map(Vec::len), Some(2));
    assert_eq!(target.version(), (1, 1));
    revert(pid, None);
    assert_eq!(target.version(), (0, 0));
}

#[test]
fn pid_gone() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let patch = build_patch(dir.path(), "patch_a", PATCH_A_C);
    let mut child = std::process::Command::new("true").spawn().expect("spawn true");
    let pid = child.id() as i32;
    child.wait().expect("reap");
    let run = apply_run(pid, &patch, &[]);
    let msg = run.failure();
    assert!(msg.contains(&format!("process {pid}")), "{msg}");
    assert!(msg.contains("no such process"), "{msg}");
    for args in [
        vec!["list".to_string(), pid.to_string()],
        vec!["revert".to_string(), pid.to_string(), "--all".to_string()],
    ] {
        let run = hotpatch(&args);
        let msg = run.failure();
        assert!(msg.contains(&format!("process {pid}")), "{args:?}: {msg}");
    }
}

/// A target that exits after a short random delay while apply runs:
/// either outcome is fine, but no hang, and a failure is a clear error
/// naming the process.
#[test]
fn pid_exits_during_apply() {
    let _serial = serial();
    let mut rng = XorShift::seeded();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let exe = build_target(d, "gcc", "target", TARGET_C, &[]);
    let patch = build_patch(d, "patch_a", PATCH_A_C);
    // How long an apply takes here.
    let window = {
        let target = Target::start(&exe, 2, None, Workers::Duty);
        let run = apply_run(target.pid(), &patch, &[]);
        assert_eq!(run.code(), 0, "{run:?}");
        run.took
    };
    let (mut applied, mut failed) = (0, Vec::new());
    for round in 0..20 {
        let mut target = Target::start(&exe, 2, None, Workers::Duty);
        let pid = target.pid();
        let delay = Duration::from_micros(rng.below(window.as_micros() as u64 * 12 / 10));
        let mut cmd = hotpatch_command(&["apply", &pid.to_string(), patch.to_str().unwrap()]);
        let started = Instant::now();
        let (mut tool, output) = spawn_piped(&mut cmd);
        std::thread::sleep(delay);
        // The target exits (stdin closed: it leaves its command loop).
        target.proc.stdin = None;
        let status = loop {
            if let Some(s) = tool.try_wait().expect("wait") {
                break s;
            }
            if started.elapsed() > Duration::from_secs(20) {
                let _ = tool.kill();
                let _ = tool.wait();
                panic!("round {round}: apply hung after the target exited");
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let (_, stderr) = output();
        let _ = target.proc.child.wait();
        match status.code() {
            Some(0) => applied += 1,
            Some(1) => {
                assert_eq!(
                    error_lines(&stderr).lines().count(),
                    1,
                    "round {round}: {stderr:?}"
                );
                assert!(!stderr.contains("panicked"), "{stderr}");
                failed.push(stderr.trim_end().to_string());
            }
            other => panic!("round {round}: exit {other:?}: {stderr}"),
        }
    }
    eprintln!(
        "apply while the target exits: {applied} applied, {} failed:",
        failed.len()
    );
    for m in &failed {
        eprintln!("  {m}");
    }
    for m in &failed {
        assert!(m.contains("process "), "the error names the process: {m}");
        assert!(
            m.contains("exited") || m.contains("no such process") || m.contains("not exist"),
            "the error says the process is gone: {m}"
        );
    }
}

/// A static binary has no dynamic loader to `dlopen` the patch.
#[test]
fn static_binary_without_dlopen() {
    let _serial = serial();
    if !Path::new("/usr/lib/x86_64-linux-gnu/libc.a").exists() {
        eprintln!("libc.a is not installed: static binary case not tested");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let exe = build_target(d, "gcc", "target", TARGET_C, &["-static"]);
    let patch = build_patch(d, "patch_a", PATCH_A_C);
    let mut target = Target::start(&exe, 2, None, Workers::Duty);
    let pid = target.pid();
    let code = target.code();
    let run = apply_run(pid, &patch, &[]);
    let msg = run.failure();
    eprintln!("static binary: {msg}");
    assert!(msg.contains(&format!("process {pid}")), "{msg}");
    assert!(msg.contains("dlopen") || msg.contains("libc"), "{msg}");
    assert_eq!(target.code(), code);
    assert!(!maps_file(pid, &patch));
    assert_eq!(target.version(), (0, 0));
    let s = target.stats();
    assert_eq!(s.bad, 0);
}

/// The target's open descriptors (what each names).
fn descriptors(pid: i32) -> Vec<String> {
    let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .filter_map(|e| {
            let e = e.ok()?;
            let to = std::fs::read_link(e.path()).ok()?;
            Some(format!("{} {}", e.file_name().to_string_lossy(), to.display()))
        })
        .collect();
    fds.sort();
    fds
}

/// The maps, less the heap (the target's own allocations move its end).
fn maps_but_heap(pid: i32) -> Vec<String> {
    maps(pid)
        .lines()
        .filter(|l| !l.ends_with("[heap]"))
        .map(str::to_string)
        .collect()
}

/// A patch `dlopen` refuses (an undefined symbol, RTLD_NOW), in the
/// program that loads it in one trip: the error is dlerror's, and the
/// target is left as it was — on a warm target exactly (maps, open
/// descriptors, code, records); on a fresh one no descriptor and no patch
/// stays (the call and state regions it made stay for the next apply).
#[test]
fn a_patch_dlopen_refuses_leaves_the_target_as_it_was() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let exe = build_target(d, "gcc", "target", TARGET_C, &[]);
    let patch_a = build_patch(d, "patch_a", PATCH_A_C);
    let bad = build_patch(
        d,
        "unresolved",
        "#include \"hotpatch.h\"\nextern long hotpatch_no_such_symbol(long);\nlong f_b(long x) { return hotpatch_no_such_symbol(x); }\nHOTPATCH_REPLACE(f, f_b);\n",
    );

    // Fresh target.
    let mut target = Target::start(&exe, 2, None, Workers::Duty);
    let pid = target.pid();
    let (code, fds) = (target.code(), descriptors(pid));
    let msg = apply_run(pid, &bad, &[]).failure().to_string();
    assert!(msg.contains("hotpatch_no_such_symbol"), "{msg}");
    assert_eq!(target.code(), code, "code changed: {msg}");
    assert_eq!(descriptors(pid), fds, "descriptors left open: {msg}");
    assert!(
        !maps(pid).contains("hotpatch-patch"),
        "a patch stayed mapped: {msg}"
    );
    assert_eq!(target.version(), (0, 0));

    // Warm target (patch A applied).
    apply(pid, &patch_a, &[]);
    target.expect(1);
    let (code, fds, before, listed) = (target.code(), descriptors(pid), maps_but_heap(pid), list(pid));
    let msg = apply_run(pid, &bad, &[]).failure().to_string();
    assert!(msg.contains("hotpatch_no_such_symbol"), "{msg}");
    assert_eq!(target.code(), code, "code changed: {msg}");
    assert_eq!(descriptors(pid), fds, "descriptors left open: {msg}");
    assert_eq!(maps_but_heap(pid), before, "maps changed: {msg}");
    assert_eq!(list(pid), listed, "records changed: {msg}");
    assert_eq!(target.version(), (1, 1));
    let s = target.stats();
    assert_eq!(s.bad, 0, "{s:?}");
    revert(pid, None);
    target.expect(0);
    assert!(target.proc.alive());
}

/// A target for the suggestions of a name not found: `everywhere` is
/// inlined into both its callers (gcc -O2 -g), `scaled` exists only as
/// `scaled.constprop.0` (every call passes 7), `ns::f` is C++.
const NAMES_C: &str = r#"
#include <stdio.h>
static int everywhere(int x) { return x * 3 + 1; }
int __attribute__((noinline)) compute_fee(int x) { return everywhere(x) + 1; }
int __attribute__((noinline)) report(int x) { return everywhere(x + 1) * 2; }
static int __attribute__((noinline)) scaled(int x, int factor) { return x * factor + 1; }
int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    char line[64];
    while (fgets(line, sizeof line, stdin))
        printf("%d\n", compute_fee(line[0]) + report(line[1]) + scaled(line[2], 7) + scaled(line[3], 7));
    return 0;
}
"#;

const NAMES_CC: &str = r#"
#include <cstdio>
namespace ns {
int __attribute__((noinline)) f(int x) { return x * 7; }
}
int main()
{
    std::setvbuf(stdout, nullptr, _IOLBF, 0);
    std::printf("ready\n");
    char line[64];
    while (std::fgets(line, sizeof line, stdin))
        std::printf("%d\n", ns::f(line[0]));
    return 0;
}
"#;

/// `apply` naming a target function that does not exist is refused (the
/// target untouched), and the message says what may have been meant:
/// near names, the function's callers when the debug info says it was
/// inlined everywhere, its compiler clones, and a C++ function's mangled
/// name.
#[test]
fn missing_names_get_suggestions() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let exe = build_sources(
        d,
        "gcc",
        "names",
        &[("names.c", NAMES_C)],
        &["-O2", "-g", "-fpatchable-function-entry=8,6"],
    );
    let mut target = Proc::spawn(&mut std::process::Command::new(&exe));
    target.line("ready", |l| l == "ready");
    let pid = target.pid();
    let compute_fee = symbol_in_process(pid, &exe, None, "compute_fee");
    let before = code_bytes(pid, compute_fee);
    let refused = |name: &str, record: &str| {
        let patch = build_patch(
            d,
            name,
            &format!("#include \"hotpatch.h\"\nint fixed(int x) {{ return x; }}\n{record};\n"),
        );
        let msg = apply_run(pid, &patch, &[]).failure().to_string();
        assert_eq!(code_bytes(pid, compute_fee), before, "{msg}");
        assert!(!maps_file(pid, &patch), "{msg}");
        msg
    };

    let msg = refused("near", "HOTPATCH_REPLACE(compute_fe, fixed)");
    assert!(
        msg.contains("no function or variable named `compute_fe`; near names: `compute_fee`"),
        "{msg}"
    );
    let msg = refused("inlined", "HOTPATCH_REPLACE(everywhere, fixed)");
    assert!(
        msg.contains("named `everywhere`; debug info says it was inlined everywhere: patch its callers (`compute_fee`, `report`)"),
        "{msg}"
    );
    let msg = refused("cloned", "HOTPATCH_REPLACE(scaled, fixed)");
    assert!(
        msg.contains(
            "named `scaled`; only compiler clones of it (each a function of its own): `scaled.constprop.0`"
        ),
        "{msg}"
    );
    // A pointer to it is refused the same way.
    let msg = refused(
        "inlined_ref",
        "HOTPATCH_FUNCTION(int, everywhere, (int));\nHOTPATCH_REPLACE(compute_fee, fixed)",
    );
    assert!(msg.contains("inlined everywhere"), "{msg}");
    assert!(!maps(pid).contains(STATE_MAP));
    assert!(target.alive());
    drop(target);

    if std::process::Command::new("g++")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("no g++: the C++ case is not run");
        return;
    }
    let cpp = build_sources(
        d,
        "g++",
        "names_cc",
        &[("names.cc", NAMES_CC)],
        &["-O2", "-fpatchable-function-entry=8,6"],
    );
    let mut target = Proc::spawn(&mut std::process::Command::new(&cpp));
    target.line("ready", |l| l == "ready");
    let patch = build_patch(
        d,
        "demangled",
        "#include \"hotpatch.h\"\nint fixed(int x) { return x; }\nHOTPATCH_REPLACE_NAMED(\"ns::f\", fixed);\n",
    );
    let msg = apply_run(target.pid(), &patch, &[]).failure().to_string();
    assert!(
        msg.contains("named `ns::f`; the same name in another form: `_ZN2ns1fEi` (ns::f(int))"),
        "{msg}"
    );
    assert!(target.alive());
}
