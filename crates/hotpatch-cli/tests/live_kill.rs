//! `hotpatch apply` SIGKILLed at random moments, many times, while workers
//! call the functions it patches. Every time: the target survives, no
//! thread is left stopped, each function is either old or new (the
//! workers never see a third value), and `hotpatch revert --all` + `list`
//! bring it back to a clean state — the original bytes, nothing listed —
//! including from a patch recorded as incomplete. Once for prepared
//! functions (flipped live), once for unprepared ones (detoured with every
//! thread stopped: a kill may land while they are).
//!
//! `sigkill_during_first_apply_and_revert` kills the *first* apply to a
//! fresh process (the state region, scratch pages and call region are
//! being created) and `revert --all`, alternately. Its rounds come from
//! `HOTPATCH_KILL_ROUNDS` (default 120; the full run is
//! `HOTPATCH_KILL_ROUNDS=1000 cargo test -p hotpatch-cli --test live_kill
//! -- first_apply`).

#[path = "common/live.rs"]
mod live;

use live::*;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

const ROUNDS: usize = 150;
const WORKERS: usize = 6;

#[test]
fn sigkill_during_apply() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = build_target(dir.path(), "gcc", "target", TARGET_C, &["-fcf-protection=full"]);
    kill_during_apply(dir.path(), &exe, &[], Workers::Idle, ROUNDS);
}

#[test]
fn sigkill_during_detour_apply() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let exe = build_unprepared(d, "gcc", "target", TARGET_C, &[]);
    // Workers at normal priority: a stop waits for every thread to be
    // scheduled, which SCHED_IDLE threads on a loaded machine may not be
    // for seconds (the apply then fails cleanly; not what this tests).
    kill_during_apply(d, &exe, &["--allow-direct-calls"], Workers::Duty, 100);
}

/// `rounds` applies of patch A to `exe` (with `extra` arguments), each
/// SIGKILLed at a random moment.
fn kill_during_apply(
    dir: &std::path::Path,
    exe: &std::path::Path,
    extra: &[&str],
    workers: Workers,
    rounds: usize,
) {
    let t0 = Instant::now();
    let mut rng = XorShift::seeded();
    let patch = build_patch(dir, "patch_a", PATCH_A_C);
    let mut target = Target::start(exe, WORKERS, None, workers);
    let pid = target.pid();
    let mut args = vec!["apply".to_string(), pid.to_string(), patch.display().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let original = target.code();
    target.expect(-1);

    // The apply window: how long a whole `hotpatch apply` takes here (the
    // median of a few, after a first one that sets the process up).
    let mut took = Vec::new();
    for _ in 0..6 {
        let run = hotpatch(&args);
        assert_eq!(run.code(), 0, "{run:?}");
        took.push(run.took);
        revert(pid, None);
    }
    took.sort();
    let window = took[took.len() / 2];
    let window_us = window.as_micros() as u64;
    check_reverted(&target.code(), &original).expect("reverted");
    // Where the entries are in the 14 bytes of `code_bytes`: the bytes
    // from entry−6 on of `f` then of `g`; a flipped function has other
    // entry bytes, a prepared-only one other padding bytes only.
    let label = |code: &[u8], at: usize| {
        let (o, c) = (&original[at..at + 14], &code[at..at + 14]);
        if c == o {
            "old"
        } else if c[6..] != o[6..] {
            "entry-flipped"
        } else {
            "padding-only"
        }
    };

    let (mut nothing, mut incomplete, mut complete, mut finished) = (0, 0, 0, 0);
    let mut states = std::collections::BTreeMap::<String, usize>::new();
    let mut hi = window_us * 11 / 10;
    for round in 0..rounds {
        // Anywhere in [0, hi), with `hi` following where applies end: it
        // shrinks after an apply that finished before the kill and grows
        // after one killed before it recorded anything (an apply that must
        // map its call region again takes longer).
        let delay = rng.below(hi);
        let maps_before = maps(pid);
        let mut cmd = hotpatch_command(&args);
        let (mut tool, output) = spawn_piped(&mut cmd);
        std::thread::sleep(Duration::from_micros(delay));
        let _ = tool.kill();
        let status = tool.wait().expect("reap hotpatch");
        let (_, stderr) = output();
        if status.code().is_some() {
            // It finished before the kill: then it must have succeeded.
            assert_eq!(status.code(), Some(0), "round {round}: {stderr}");
            finished += 1;
            hi = (hi * 9 / 10).max(window_us / 2);
        }

        let what = format!("round {round} (delay {delay} µs)");
        survived(&mut target, &what, &stderr, &maps_before);
        let code = target.code();
        *states
            .entry(format!("f {} g {}", label(&code, 0), label(&code, 14)))
            .or_default() += 1;

        let state = list(pid);
        match state["patches"].as_array().map(|p| p.as_slice()) {
            Some([]) | None => {
                nothing += 1;
                hi = (hi * 11 / 10).min(window_us * 4);
            }
            Some([p]) if p["complete"] == false => incomplete += 1,
            Some([p]) if p["complete"] == true => complete += 1,
            other => panic!("round {round}: unexpected patches {other:?}"),
        }
        clean_again(&mut target, &original, &what);
    }
    // The patch still applies and works after all that.
    apply(pid, &patch, extra);
    target.expect(1);
    target.expect(-1);
    revert(pid, None);
    target.expect(0);
    let s = target.stats();
    assert_eq!((s.bad, s.late), (0, 0), "{s:?}");
    check_reverted(&target.code(), &original).expect("reverted");
    assert_no_thread_stopped(pid);
    eprintln!(
        "{rounds} kills over a {window:.1?} apply window: no record {nothing}, incomplete {incomplete}, \
         complete {complete} (finished before the kill {finished}); code states {states:?}; \
         {} calls, 0 bad; total {:.1?}",
        s.calls,
        t0.elapsed()
    );
}

/// After a kill: the target lives, no thread is left stopped, and each
/// function is old or new (patch A), as its main thread and every worker
/// see it.
fn survived(target: &mut Target, what: &str, stderr: &str, maps_before: &str) {
    if let Ok(Some(died)) = target.proc.child.try_wait() {
        panic!(
            "{what}: the target died ({died:?}, signal {:?}); \
             the tool said {stderr:?}; its maps before the round:\n{maps_before}",
            died.signal()
        );
    }
    assert_no_thread_stopped(target.pid());
    let (fv, gv) = target.version();
    assert!(fv <= 1 && gv <= 1, "{what}: versions {fv} {gv}");
    let s = target.stats();
    assert_eq!(s.bad, 0, "{what}: a third value: {s:?}");
}

/// `revert --all` by a fresh tool run brings the target back: nothing
/// listed, the original entry bytes, the original functions.
fn clean_again(target: &mut Target, original: &[u8], what: &str) {
    let pid = target.pid();
    let reverted = revert(pid, None);
    assert!(reverted.is_array(), "{what}: {reverted}");
    assert_eq!(
        listed_ids(pid),
        Vec::<u64>::new(),
        "{what}: list after revert --all"
    );
    if let Err(e) = check_reverted(&target.code(), original) {
        panic!("{what}: code bytes after revert --all: {e}");
    }
    assert_eq!(target.version(), (0, 0), "{what}: after revert --all");
    no_thread_keeps_a_lent_priority(pid, what);
}

/// No thread keeps a real-time policy (the target's own are normal or idle):
/// a program killed with its tool gives back the real-time priority it
/// was lent when it gives up or is cancelled (a moment after the fresh
/// tool's run, at most).
fn no_thread_keeps_a_lent_priority(pid: i32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let raised: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.filter_map(|e| {
                    let tid = e.ok()?.file_name().to_string_lossy().to_string();
                    let sched = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/sched")).ok()?;
                    let policy = sched.lines().find(|l| l.starts_with("policy"))?.to_string();
                    // SCHED_FIFO (1) or SCHED_RR (2): what the tool lends.
                    let value = policy.rsplit(':').next()?.trim().to_string();
                    (value == "1" || value == "2").then(|| format!("{tid}: {policy}"))
                })
                .collect()
            })
            .unwrap_or_default();
        if raised.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: threads keep another policy: {raised:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Run `args` and SIGKILL it after `delay`; whether it finished first
/// (then it must have succeeded), and its stderr.
fn run_killed(args: &[String], delay: Duration, what: &str) -> (bool, String) {
    let mut cmd = hotpatch_command(args);
    let (mut tool, output) = spawn_piped(&mut cmd);
    std::thread::sleep(delay);
    let _ = tool.kill();
    let status = tool.wait().expect("reap hotpatch");
    let (_, stderr) = output();
    let finished = status.code().is_some();
    if finished {
        assert_eq!(status.code(), Some(0), "{what}: {stderr}");
    }
    (finished, stderr)
}

#[test]
fn sigkill_during_first_apply_and_revert() {
    let _serial = serial();
    let rounds: usize = std::env::var("HOTPATCH_KILL_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(120);
    let t0 = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let exe = build_target(d, "gcc", "target", TARGET_C, &[]);
    let patch = build_patch(d, "patch_a", PATCH_A_C);
    let mut rng = XorShift::seeded();
    let apply_args = |pid: i32| vec!["apply".to_string(), pid.to_string(), patch.display().to_string()];
    let revert_args = |pid: i32| vec!["revert".to_string(), pid.to_string(), "--all".to_string()];
    let fresh = || {
        let mut t = Target::start(&exe, 2, None, Workers::Duty);
        t.expect(-1);
        t
    };

    // The windows: a first apply to a fresh process, and a revert --all.
    let (mut first, mut back) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let t = fresh();
        let run = hotpatch(&apply_args(t.pid()));
        assert_eq!(run.code(), 0, "{run:?}");
        first.push(run.took);
        let run = hotpatch(&revert_args(t.pid()));
        assert_eq!(run.code(), 0, "{run:?}");
        back.push(run.took);
    }
    first.sort();
    back.sort();
    let (first_us, back_us) = (
        first[1].as_micros() as u64 * 11 / 10,
        back[1].as_micros() as u64 * 11 / 10,
    );

    let mut target = fresh();
    let original = target.code();
    let (mut killed_first, mut killed_revert, mut finished) = (0, 0, 0);
    for round in 0..rounds {
        let reverting = round % 2 == 1;
        if !reverting {
            // A first apply: to a process the tool never touched.
            target = fresh();
        } else {
            apply(target.pid(), &patch, &[]);
        }
        let pid = target.pid();
        let maps_before = maps(pid);
        let (args, window) = if reverting {
            (revert_args(pid), back_us)
        } else {
            (apply_args(pid), first_us)
        };
        let delay = rng.below(window.max(1));
        let what = format!(
            "round {round} ({} killed after {delay} µs)",
            if reverting { "revert" } else { "first apply" }
        );
        let (done, stderr) = run_killed(&args, Duration::from_micros(delay), &what);
        if done {
            finished += 1;
        } else if reverting {
            killed_revert += 1;
        } else {
            killed_first += 1;
        }
        survived(&mut target, &what, &stderr, &maps_before);
        // The next tool run can always read the record...
        let listed = hotpatch(&["list".to_string(), pid.to_string(), "--json".to_string()]);
        assert_eq!(listed.code(), 0, "{what}: list: {}", listed.failure());
        // ... and revert whatever is there.
        clean_again(&mut target, &original, &what);
    }
    eprintln!(
        "{rounds} rounds: killed {killed_first} first applies (window {first_us} µs) and \
         {killed_revert} reverts (window {back_us} µs), {finished} finished first; total {:.1?}",
        t0.elapsed()
    );
}
