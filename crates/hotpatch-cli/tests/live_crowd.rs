//! A target with a crowd of threads, as a big server has (issue 10): 500
//! threads, most blocked in `read`, `futex`, `nanosleep` and `epoll_wait`,
//! a few busy calling the patched functions. Patched and reverted 20
//! times, every result checked; every apply one trip once warm; and at the
//! end every blocked call completes with what it waited for — a read its
//! byte, a condition its broadcast, an epoll its event, every sleep its
//! full length.
//!
//! `HOTPATCH_CROWD_EACH` (threads of each blocked kind, default 124) and
//! `HOTPATCH_CROWD_CYCLES` (default 20) change the size.

#[path = "common/live.rs"]
mod live;

use live::*;
use std::process::Command;

const CROWD_C: &str = include_str!("live/crowd.c");

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn expect(proc: &mut Proc, v: i32) {
    proc.send(&format!("expect {v}"));
    let want = format!("expecting {v}");
    proc.line(&want, |l| l == want);
}

#[test]
fn a_crowd_of_threads_is_patched_and_reverted() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let exe = build_target(d, "gcc", "crowd", CROWD_C, &[]);
    let patch_a = build_patch(d, "patch_a", PATCH_A_C);
    let patch_b = build_patch(d, "patch_b", PATCH_B_C);
    let busy = 4;
    let each = env_or("HOTPATCH_CROWD_EACH", 124);
    let cycles = env_or("HOTPATCH_CROWD_CYCLES", 20);
    let mut proc = Proc::spawn(Command::new(&exe).arg(busy.to_string()).arg(each.to_string()));
    let ready = proc.line("ready", |l| l.starts_with("ready "));
    let threads = num_field(&ready, "threads=") as usize;
    assert_eq!(threads, busy + 4 * each + 1);
    let pid = proc.pid();
    let mut applies = Vec::new();
    let mut trips = Vec::new();
    for i in 0..cycles {
        let (patch, v) = if i % 2 == 0 { (&patch_a, 1) } else { (&patch_b, 2) };
        expect(&mut proc, -1);
        let applied = apply(pid, patch, &[]);
        applies.push(applied["elapsed_us"].as_u64().expect("elapsed_us"));
        trips.push(applied["remote_calls"].as_u64().expect("remote_calls"));
        expect(&mut proc, v);
        expect(&mut proc, -1);
        revert(pid, None);
        expect(&mut proc, 0);
    }
    // One trip per apply once the call region exists (the first maps it).
    assert!(trips[0] <= 2, "first apply: {} trips", trips[0]);
    assert!(trips[1..].iter().all(|&t| t == 1), "warm applies: {trips:?}");
    proc.send("stats");
    let stats = proc.line("stats", |l| l.starts_with("stats "));
    assert_eq!(num_field(&stats, "bad="), 0, "{stats}");
    assert_eq!(num_field(&stats, "short_sleeps="), 0, "{stats}");
    proc.send("finish");
    let done = proc.line("finished", |l| l.starts_with("finished "));
    for kind in ["readers=", "conds=", "epolls=", "sleepers="] {
        assert_eq!(num_field(&done, kind) as usize, each, "{kind} {done}");
    }
    assert_eq!(num_field(&done, "short_sleeps="), 0, "{done}");
    applies.sort_unstable();
    eprintln!(
        "{threads} threads, {cycles} cycles: apply median {} µs (min {}, max {}); {stats}",
        applies[applies.len() / 2],
        applies[0],
        applies[applies.len() - 1]
    );
}
