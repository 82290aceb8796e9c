//! `hotpatch apply` on a target under load: worker threads call the
//! prepared functions `f` and `g` in a loop, other threads sit blocked in
//! `read` (a FIFO), `nanosleep`, `pthread_cond_wait` and `epoll_wait`.
//!
//! Every call returns the old or the new version, never anything else;
//! once the test tells the target the patch is in, every worker's next
//! calls are all new; the blocked calls complete as if nothing happened.
//! Four builds (gcc and clang, with and without `-fcf-protection`) and
//! 1, 8 and 64 workers.

#[path = "common/live.rs"]
mod live;

use live::*;
use std::time::Instant;

struct Case {
    cc: &'static str,
    cf_protection: bool,
    workers: usize,
}

fn load_and_blocked_threads(case: Case) {
    let _serial = serial();
    let t0 = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let name = format!(
        "target-{}{}-{}",
        case.cc,
        if case.cf_protection { "-cf" } else { "" },
        case.workers
    );
    let cf = if case.cf_protection {
        "-fcf-protection=full"
    } else {
        "-fcf-protection=none"
    };
    let exe = build_target(dir.path(), case.cc, &name, TARGET_C, &[cf]);
    let patch = build_patch(dir.path(), "patch_a", PATCH_A_C);
    let fifo = mkfifo(dir.path(), "data.fifo");

    let mut target = Target::start(&exe, case.workers, Some(&fifo), Workers::Busy);
    let pid = target.pid();
    let original = target.code();
    // The workers run the original, and all of them are calling.
    target.expect(0);
    target.expect(-1);
    // A sleep in flight before the apply.
    target.proc.line("a sleep", |l| l.starts_with("slept "));

    let applied_at = Instant::now();
    let applied = apply(pid, &patch, &[]);
    let apply_took = applied_at.elapsed();
    let functions = applied["functions"].as_array().expect("functions[]");
    let mut names: Vec<&str> = functions.iter().map(|f| f["name"].as_str().unwrap()).collect();
    names.sort_unstable();
    assert_eq!(names, ["f", "g"], "{applied}");
    for f in functions {
        // Prepared functions flip with every thread running.
        assert_eq!(f["mode"], "live", "{case_name}: {f}", case_name = name);
    }
    assert_ne!(target.code(), original, "code bytes did not change");

    // Every worker's next calls are all new.
    target.expect(1);
    let s = target.stats();
    assert_eq!(s.bad, 0, "{name}: results that are neither old nor new: {s:?}");
    assert_eq!(s.late, 0, "{name}: old results after the patch was in: {s:?}");
    assert!(s.a > 0 && s.old > 0, "{s:?}");
    assert_eq!(target.version(), (1, 1), "main thread's calls");

    // The blocked calls complete correctly.
    // read(): gets exactly the bytes written after the patch.
    write_fifo(&fifo, "after-the-patch\n");
    let read = target.proc.line("pipe-read", |l| l.starts_with("pipe-read"));
    assert_eq!(read, "pipe-read 16 after-the-patch");
    // nanosleep(): the sleeps in flight during the apply, and one started
    // after it, all slept their full time and returned 0.
    let after = target.proc.seen.len();
    target
        .proc
        .line("a sleep after the apply", |l| l.starts_with("slept "));
    target
        .proc
        .line("a second sleep after the apply", |l| l.starts_with("slept "));
    let sleeps: Vec<String> = target
        .proc
        .seen
        .iter()
        .filter(|l| l.starts_with("slept "))
        .cloned()
        .collect();
    for l in &sleeps {
        let f: Vec<&str> = l.split_whitespace().collect();
        let slept: u64 = f[1].parse().expect("slept ns");
        let requested: u64 = f[3].parse().expect("requested ns");
        assert!(slept >= requested, "{name}: nanosleep cut short: {l}");
        assert!(l.contains(" r=0 errno=0 "), "{name}: nanosleep failed: {l}");
    }
    assert!(
        target.proc.seen[after..].iter().any(|l| l.starts_with("slept ")),
        "no sleep reported after the apply"
    );
    // pthread_cond_wait(): wakes when signalled.
    target.proc.send("cond");
    let cond = target.proc.line("cond-woke", |l| l.starts_with("cond-woke"));
    // epoll_wait(): wakes when the eventfd is written. EINTR is counted by
    // the target (it retries) and reported, not hidden.
    target.proc.send("epoll");
    let epoll = target.proc.line("epoll-woke", |l| l.starts_with("epoll-woke"));
    assert!(epoll.starts_with("epoll-woke n=1 data=7 "), "{epoll}");
    let eintr: Vec<String> = target
        .proc
        .seen
        .iter()
        .filter(|l| l.starts_with("epoll-eintr"))
        .cloned()
        .collect();

    // Still correct, nothing stopped, and revert brings the original back.
    let s = target.stats();
    assert_eq!((s.bad, s.late), (0, 0), "{s:?}");
    assert_no_thread_stopped(pid);
    target.expect(-1);
    let reverted = revert(pid, None);
    assert_eq!(reverted.as_array().map(Vec::len), Some(1), "{reverted}");
    check_reverted(&target.code(), &original).expect("revert restores the entries");
    target.expect(0);
    let s = target.stats();
    assert_eq!((s.bad, s.late), (0, 0), "{s:?}");
    assert_eq!(listed_ids(pid), Vec::<u64>::new());
    assert!(target.proc.alive());
    eprintln!(
        "{name}: apply {apply_took:.1?} (engine {} µs), {} calls ({} old, {} new), {} sleeps checked, \
         {cond}, {epoll}, EINTR lines {eintr:?}; total {:.1?}",
        applied["elapsed_us"],
        s.calls,
        s.old,
        s.a,
        sleeps.len(),
        t0.elapsed()
    );
}

#[test]
fn gcc_one_worker() {
    load_and_blocked_threads(Case {
        cc: "gcc",
        cf_protection: false,
        workers: 1,
    });
}

#[test]
fn clang_cf_protection_8_workers() {
    load_and_blocked_threads(Case {
        cc: "clang",
        cf_protection: true,
        workers: 8,
    });
}

#[test]
fn gcc_cf_protection_8_workers() {
    load_and_blocked_threads(Case {
        cc: "gcc",
        cf_protection: true,
        workers: 8,
    });
}

#[test]
fn clang_64_workers() {
    load_and_blocked_threads(Case {
        cc: "clang",
        cf_protection: false,
        workers: 64,
    });
}
