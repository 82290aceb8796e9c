//! 1,000 apply/revert cycles while 8 worker threads call the patched
//! functions: no crash, every call returns the old or the new version and
//! never anything else, the target is alive at the end and nothing is
//! left applied. Driven through the library (`hotpatch::engine`): 1,000
//! runs of the command would mostly measure process start-up.

#[path = "common/live.rs"]
mod live;

use hotpatch::engine::{self, ApplyOptions, FlipMode, Which};
use live::*;
use std::time::{Duration, Instant};

const CYCLES: usize = 1000;
const WORKERS: usize = 8;

#[test]
fn thousand_apply_revert_cycles_under_load() {
    let _serial = serial();
    let t0 = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = build_target(dir.path(), "gcc", "target", TARGET_C, &["-fcf-protection=none"]);
    let patch = build_patch(dir.path(), "patch_a", PATCH_A_C);
    let cycles = std::env::var("HOTPATCH_TEST_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(CYCLES);
    // HOTPATCH_TEST_WORKERS=duty|idle: workers that pause, for a quicker run.
    let mode = match std::env::var("HOTPATCH_TEST_WORKERS").as_deref() {
        Ok("duty") => Workers::Duty,
        Ok("idle") => Workers::Idle,
        _ => Workers::Busy,
    };
    let mut target = Target::start(&exe, WORKERS, None, mode);
    let pid = target.pid();
    let original = target.code();
    target.expect(0);
    target.expect(-1);
    let options = ApplyOptions::default();
    let (mut apply_time, mut revert_time) = (Duration::ZERO, Duration::ZERO);
    let mut slowest = Duration::ZERO;
    for cycle in 0..cycles {
        let t = Instant::now();
        let applied =
            engine::apply(pid, &patch, &options).unwrap_or_else(|e| panic!("cycle {cycle}: apply: {e}"));
        let a = t.elapsed();
        assert_eq!(applied.functions.len(), 2);
        for f in &applied.functions {
            assert_eq!(f.mode, FlipMode::Live, "cycle {cycle}: {f:?}");
        }
        let t = Instant::now();
        let reverted = engine::revert(pid, Which::Patch(applied.patch.id))
            .unwrap_or_else(|e| panic!("cycle {cycle}: revert: {e}"))
            .reverted;
        let r = t.elapsed();
        assert_eq!(reverted.len(), 1);
        assert_eq!(reverted[0].restored.len(), 2, "cycle {cycle}: {reverted:?}");
        apply_time += a;
        revert_time += r;
        slowest = slowest.max(a + r);
        if cycle % 100 == 99 {
            assert!(target.proc.alive(), "target died in cycle {cycle}");
            let s = target.stats();
            assert_eq!(
                s.bad, 0,
                "cycle {cycle}: results that are neither old nor new: {s:?}"
            );
            if let Err(e) = check_reverted(&target.code(), &original) {
                panic!("cycle {cycle}: code bytes after revert: {e}");
            }
        }
    }
    // The engine held real-time priority for each apply and revert, and
    // gave it back each time.
    assert!(
        !hotpatch::process::priority::is_realtime(),
        "this thread was left at real-time priority"
    );
    // Alive, correct, nothing applied, original code.
    assert!(target.proc.alive(), "target died");
    assert_no_thread_stopped(pid);
    target.expect(0);
    let s = target.stats();
    assert_eq!((s.bad, s.late), (0, 0), "{s:?}");
    assert!(s.a > 0, "the patch never ran: {s:?}");
    check_reverted(&target.code(), &original).expect("reverted");
    assert_eq!(listed_ids(pid), Vec::<u64>::new(), "`list` after the cycles");
    let state = engine::list(pid).expect("list");
    // Nothing applied; each function's route is kept dormant and reused
    // by the next apply, so 1,000 cycles use one slot per function.
    assert!(state.patches.is_empty(), "{state:?}");
    assert!(state.functions.iter().all(|f| f.versions.is_empty()), "{state:?}");
    let slots: u64 = state
        .scratch
        .iter()
        .filter(|r| !r.executable)
        .map(|r| r.used)
        .sum();
    assert!(
        slots <= 8 * state.functions.len() as u64,
        "scratch grew: {state:?}"
    );
    eprintln!(
        "{cycles} cycles with {WORKERS} {mode:?} workers: apply {:.1?} + revert {:.1?} per cycle \
         (slowest cycle {slowest:.1?}); {} calls, {} old, {} new, 0 bad; total {:.1?}",
        apply_time / cycles as u32,
        revert_time / cycles as u32,
        s.calls,
        s.old,
        s.a,
        t0.elapsed()
    );
}
