//! The README's main job, `hotpatch demo`: with the example server built
//! with padding (a live flip) and without (a detour), the fix goes in and
//! comes out under load with no failed, wrong or stale answer (the demo
//! exits non-zero otherwise).

#[path = "common/live.rs"]
mod live;

use live::*;

fn demo(extra: &[&str], route: &str) {
    let mut args = vec!["demo", "--window-ms", "300"];
    args.extend_from_slice(extra);
    let run = hotpatch(&args);
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout, run.stderr);
    let out = &run.stdout;
    assert!(
        out.contains(&format!("compute_fee -> fix.so ({route}, ")),
        "{out}"
    );
    assert!(
        out.contains("after:   fee(500) = 5, fee(2500000) = 25000"),
        "{out}"
    );
    assert!(
        out.contains("after revert: fee(500) = 5, fee(2500000) = 0"),
        "{out}"
    );
    assert!(
        out.contains(" 0 failed, 0 wrong answers, 0 old answers after apply"),
        "{out}"
    );
    assert!(out.contains("== done: no failed request"), "{out}");
}

#[test]
fn demo_prepared_and_unprepared() {
    let _serial = serial();
    demo(&[], "prepared");
    demo(&["--unprepared"], "detour");
}
