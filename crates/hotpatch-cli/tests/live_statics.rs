//! A patch that reads and writes a target `static` variable (named
//! `file.c:name`, since two files define `static int counter`), calls a
//! target `static` function (HOTPATCH_FUNCTION) and the original of the
//! function it replaces (HOTPATCH_ORIGINAL). The target sees the values.

#[path = "common/live.rs"]
mod live;

use live::*;

#[test]
fn statics_and_the_original() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = build_statics(dir.path());
    let patch = build_patch(dir.path(), "statics_patch", STATICS_PATCH_C);
    let mut target = Statics::start(&exe);
    let pid = target.pid();

    // The original: compute(x) = x + 1, a.c:counter += 1 per call,
    // b.c:counter (starts at 1000) += 1 per call in main.
    let before = target.call(5);
    assert_eq!(before, StaticsCall { r: 6, a: 1, b: 1001 });

    let applied = apply(pid, &patch, &[]);
    assert_eq!(applied["functions"][0]["name"], "compute", "{applied}");
    // Pointers only (its own, the header's): nothing is copied.
    assert_eq!(applied["warnings"], serde_json::json!([]), "{applied}");

    // The patch: (orig(x)) * 1000 + helper(x), with helper(x) = 100 x; it
    // adds 10 to a.c:counter and the original adds 1. b.c's is untouched.
    assert_eq!(
        target.call(5),
        StaticsCall {
            r: 6 * 1000 + 500,
            a: 12,
            b: 1002
        }
    );
    assert_eq!(
        target.call(7),
        StaticsCall {
            r: 8 * 1000 + 700,
            a: 23,
            b: 1003
        }
    );

    // The patch's pointer holds a.c's counter, as readelf + maps place it:
    // the value in the target's memory is the one the target printed.
    let a_counter = symbol_in_process(pid, &exe, Some("statics_a.c"), "counter");
    let b_counter = symbol_in_process(pid, &exe, Some("statics_b.c"), "counter");
    let read_i32 = |at: u64| i32::from_le_bytes(read_mem(pid, at, 4).try_into().unwrap());
    assert_eq!((read_i32(a_counter), read_i32(b_counter)), (23, 1003));

    revert(pid, None);
    assert_eq!(target.call(1), StaticsCall { r: 2, a: 24, b: 1004 });
    assert_eq!(listed_ids(pid), Vec::<u64>::new());
}

/// The classic mistake: statics_a.c fixed and recompiled as the patch. Its
/// `static int counter` is the patch's own, so the target's stays put;
/// `apply` says so (naming the variable, both sizes and the function that
/// uses it) and applies the patch all the same.
const COPYING_PATCH_C: &str = r#"
#include "hotpatch.h"
static int counter;
long compute_fixed(long x)
{
    counter++;
    return x + 2;
}
HOTPATCH_REPLACE(compute, compute_fixed);
"#;

#[test]
fn a_copied_static_is_warned_about_and_applied() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = build_statics(dir.path());
    let patch = build_patch(dir.path(), "copying_patch", COPYING_PATCH_C);
    let mut target = Statics::start(&exe);
    let pid = target.pid();
    assert_eq!(target.call(5), StaticsCall { r: 6, a: 1, b: 1001 });

    let run = hotpatch(&["apply".to_string(), pid.to_string(), patch.display().to_string()]);
    assert_eq!(run.code(), 0, "{run:?}");
    assert!(run.stdout.contains("patch 1 applied"), "{run:?}");
    let warning = run
        .stderr
        .lines()
        .find(|l| l.contains("own variable"))
        .unwrap_or_else(|| panic!("no warning: {run:?}"));
    assert!(
        warning.starts_with("hotpatch: warning: ") && warning.contains("copying_patch.so: the patch defines"),
        "{warning}"
    );
    assert!(
        warning.contains(
            "own variable `counter` (4 bytes; the target has 2 variables of that name: 4, 4 bytes)"
        ),
        "{warning}"
    );
    assert!(warning.contains("used by compute_fixed"), "{warning}");
    assert!(
        warning.contains(r#"NAME one of "statics_a.c:counter", "statics_b.c:counter""#),
        "{warning}"
    );
    // The patch runs, and counts into its copy: a.c's counter stays at 1.
    assert_eq!(target.call(5), StaticsCall { r: 7, a: 1, b: 1002 });
    revert(pid, None);

    let applied = apply(pid, &patch, &[]);
    let warnings = applied["warnings"].as_array().expect("warnings");
    assert_eq!(warnings.len(), 1, "{applied}");
    let w = &warnings[0];
    assert_eq!(w["kind"], "data-copy", "{w}");
    assert_eq!(w["name"], "counter", "{w}");
    assert_eq!(w["patch_size"], 4, "{w}");
    assert_eq!(
        w["target"],
        serde_json::json!([{"name": "statics_a.c:counter", "size": 4}, {"name": "statics_b.c:counter", "size": 4}]),
        "{w}"
    );
    assert_eq!(w["read_only"], false, "{w}");
    assert_eq!(w["used_by"], serde_json::json!(["compute_fixed"]), "{w}");
    assert!(
        w["message"].as_str().is_some_and(|m| m.contains("`counter`")),
        "{w}"
    );
    revert(pid, None);
}
