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
