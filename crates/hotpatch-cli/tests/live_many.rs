//! A patch of many functions (300): a second patch supersedes every one
//! of them in one trip (the live slots' table does not fit the program's
//! data block and goes to the free end of our scratch), every function
//! answering the new version after it, with workers calling them all the
//! while.

#[path = "common/live.rs"]
mod live;

use live::*;
use std::fmt::Write as _;
use std::process::Command;

const N: usize = 300;

fn target_source() -> String {
    let mut c = String::from(
        "#include <pthread.h>\n#include <stdio.h>\n#include <string.h>\n#include <stdatomic.h>\n\
         #define P __attribute__((noinline, noipa))\n",
    );
    for k in 0..N {
        let _ = writeln!(c, "P long f{k}(long x) {{ return x * {k} + 1; }}");
    }
    c.push_str("typedef long (*fn)(long);\nstatic fn all[] = {");
    for k in 0..N {
        let _ = write!(c, "f{k},");
    }
    c.push_str(
        "};\n#define N (sizeof all / sizeof *all)\n\
         static atomic_long garbage;\n\
         static int version(int k, long x, long r) { for (int v = 1; v <= 3; v++) if (r == x * k + v) return v; return -1; }\n\
         static void *worker(void *a) { (void)a; for (long x = 0;; x++) { int k = x % N; if (version(k, x, all[k](x)) < 0) atomic_fetch_add(&garbage, 1); } return 0; }\n\
         int main(void) {\n  setvbuf(stdout, 0, _IOLBF, 0);\n  pthread_t t; for (int i = 0; i < 2; i++) pthread_create(&t, 0, worker, 0);\n  printf(\"ready\\n\");\n  char line[64];\n  while (fgets(line, sizeof line, stdin)) {\n    int v; if (sscanf(line, \"check %d\", &v) != 1) continue;\n    int wrong = 0; for (int k = 0; k < (int)N; k++) if (version(k, 7, all[k](7)) != v) wrong++;\n    printf(\"checked wrong=%d garbage=%ld\\n\", wrong, atomic_load(&garbage));\n  }\n  return 0;\n}\n",
    );
    c
}

fn patch_source(v: usize) -> String {
    let mut c = String::from("#include \"hotpatch.h\"\n");
    for k in 0..N {
        let _ = writeln!(
            c,
            "long p{k}(long x) {{ return x * {k} + {v}; }}\nHOTPATCH_REPLACE(f{k}, p{k});"
        );
    }
    c
}

fn check(proc: &mut Proc, v: i32) {
    proc.send(&format!("check {v}"));
    let l = proc.line("checked", |l| l.starts_with("checked "));
    assert_eq!(num_field(&l, "wrong="), 0, "version {v}: {l}");
    assert_eq!(num_field(&l, "garbage="), 0, "version {v}: {l}");
}

#[test]
fn a_second_patch_supersedes_three_hundred_functions_in_one_trip() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let exe = build_target(d, "gcc", "many", &target_source(), &[]);
    let patch_2 = build_patch(d, "patch_2", &patch_source(2));
    let patch_3 = build_patch(d, "patch_3", &patch_source(3));
    let mut proc = Proc::spawn(&mut Command::new(&exe));
    proc.line("ready", |l| l == "ready");
    let pid = proc.pid();
    check(&mut proc, 1);
    let first = apply(pid, &patch_2, &[]);
    assert_eq!(first["functions"].as_array().map(Vec::len), Some(N));
    check(&mut proc, 2);
    let second = apply(pid, &patch_3, &[]);
    let functions = second["functions"].as_array().expect("functions");
    assert_eq!(functions.len(), N);
    let modes: std::collections::BTreeSet<String> = functions.iter().map(|f| f["mode"].to_string()).collect();
    assert_eq!(modes.len(), 1, "modes: {modes:?}");
    assert!(modes.contains("\"superseded\""), "modes: {modes:?}");
    assert_eq!(
        second["remote_calls"], 1,
        "a supersede of {N} slots took {} trips",
        second["remote_calls"]
    );
    check(&mut proc, 3);
    // Back to patch 2's versions, then to the original.
    let id = second["patch"]["id"].as_u64().expect("id");
    let stepped = revert_json(pid, Some(id));
    assert_eq!(
        stepped["remote_calls"], 1,
        "{N} slots stepping back took {} trips",
        stepped["remote_calls"]
    );
    check(&mut proc, 2);
    revert(pid, None);
    check(&mut proc, 1);
}

/// The routes and entries of many functions are written in page-sized
/// batches: one function in the middle whose padding is not what the plan
/// expects (another tool's byte) fails the whole apply before any byte is
/// written, and every function keeps its original code and bytes.
#[test]
fn one_changed_padding_among_three_hundred_fails_the_apply_with_nothing_changed() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let exe = build_target(d, "gcc", "many", &target_source(), &[]);
    let patch_2 = build_patch(d, "patch_2", &patch_source(2));
    let mut proc = Proc::spawn(&mut Command::new(&exe));
    proc.line("ready", |l| l == "ready");
    let pid = proc.pid();
    let entries: Vec<u64> = (0..N)
        .map(|k| symbol_in_process(pid, &exe, None, &format!("f{k}")))
        .collect();
    let before: Vec<Vec<u8>> = entries.iter().map(|&e| code_bytes(pid, e)).collect();
    // An int3 in f150's padding, where the long jump goes (never executed).
    let tampered = entries[N / 2] - 6;
    assert_eq!(read_mem(pid, tampered, 1), [0x90], "f150's padding");
    write_mem(pid, tampered, &[0xcc]);
    let run = hotpatch(&["apply", &pid.to_string(), patch_2.to_str().expect("path")]);
    let error = run.failure();
    assert!(
        error.contains(&format!("{tampered:#x}")),
        "the error names the changed address {tampered:#x}: {error}"
    );
    check(&mut proc, 1);
    for (k, (&e, b)) in entries.iter().zip(&before).enumerate() {
        let now = code_bytes(pid, e);
        if k == N / 2 {
            assert_eq!(now[..1], [0xcc], "f{k}");
            assert_eq!(now[1..], b[1..], "f{k}");
        } else {
            assert_eq!(&now, b, "f{k}: bytes changed by a failed apply");
        }
    }
    // With the byte back, the same patch applies and reverts.
    write_mem(pid, tampered, &[0x90]);
    apply(pid, &patch_2, &[]);
    check(&mut proc, 2);
    revert(pid, None);
    check(&mut proc, 1);
}
