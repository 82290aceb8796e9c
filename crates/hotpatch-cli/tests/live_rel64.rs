//! `rel64` records: a patch reaches a target's static variable and static
//! function through 8-byte sites the engine fills with
//! `address(symbol) + addend - address(base)` (what `hotpatch build`
//! emits for `-mcmodel=large` code). See `live/rel64_target.c` and
//! `live/rel64_patch.c`.

#[path = "common/live.rs"]
mod live;

use live::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const TARGET: &str = include_str!("live/rel64_target.c");
const PATCH: &str = include_str!("live/rel64_patch.c");

/// The addend of the counter's record in `rel64_patch.c`.
const COUNTER_ADDEND: i64 = -0x40;

struct Rel64Target {
    proc: Proc,
}

/// What the target says of its counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counter {
    patched: i64,
    original: i64,
    bad: i64,
}

impl Rel64Target {
    fn start(exe: &Path, workers: usize) -> Rel64Target {
        let mut proc = Proc::spawn(Command::new(exe).arg(workers.to_string()));
        proc.line("ready", |l| l.starts_with("ready "));
        Rel64Target { proc }
    }

    fn pid(&self) -> i32 {
        self.proc.pid()
    }

    fn counter(&mut self) -> Counter {
        self.proc.send("counter");
        let l = self.proc.line("counter", |l| l.starts_with("counter "));
        Counter {
            patched: num_field(&l, "patched="),
            original: num_field(&l, "original="),
            bad: num_field(&l, "bad="),
        }
    }

    fn call(&mut self, x: i64) -> i64 {
        self.proc.send(&format!("call {x}"));
        let prefix = format!("call {x} ");
        let l = self.proc.line(&prefix, |l| l.starts_with(&prefix));
        num_field(&l, "r=")
    }

    /// Poll the counter until `done` holds, for at most [`WAIT`].
    fn wait_for(&mut self, what: &str, done: impl Fn(&Counter) -> bool) -> Counter {
        let deadline = Instant::now() + WAIT;
        loop {
            let c = self.counter();
            if done(&c) {
                return c;
            }
            assert!(Instant::now() < deadline, "{what}: never happened; last {c:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn helper(x: i64) -> i64 {
    3 * x + 1
}

fn build(dir: &Path) -> std::path::PathBuf {
    build_sources(
        dir,
        "gcc",
        "rel64_target",
        &[("rel64_target.c", TARGET)],
        &["-O2", "-pthread", "-fpatchable-function-entry=8,6"],
    )
}

/// The patch, with its GOT exported as `__hotpatch_got`.
fn build_rel64_patch(dir: &Path, name: &str, source: &str) -> std::path::PathBuf {
    build_sources(
        dir,
        "gcc",
        &format!("{name}.so"),
        &[(&format!("{name}.c"), source)],
        &[
            "-O2",
            "-shared",
            "-fPIC",
            &include_arg(),
            "-Wl,--defsym,__hotpatch_got=ADDR(.got.plt)",
        ],
    )
}

fn read_u64(pid: i32, at: u64) -> u64 {
    u64::from_le_bytes(read_mem(pid, at, 8).try_into().expect("8 bytes"))
}

#[test]
fn patched_code_reaches_the_target_statics_through_rel64_sites() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = build(dir.path());
    let patch = build_rel64_patch(dir.path(), "rel64_patch", PATCH);
    let mut target = Rel64Target::start(&exe, 3);
    let pid = target.pid();

    // The original runs: only the low half moves.
    assert_eq!(target.call(5), helper(5));
    let before = target.wait_for("original calls", |c| c.original > 1000);
    assert_eq!((before.patched, before.bad), (0, 0), "{before:?}");

    for round in 0..2 {
        let applied = apply(pid, &patch, &[]);
        assert_eq!(applied["functions"][0]["name"], "work", "{applied}");

        // The sites hold symbol + addend - base, as readelf and the maps
        // place them.
        let counter = symbol_in_process(pid, &exe, None, "counter");
        let helper_at = symbol_in_process(pid, &exe, None, "helper");
        let anchor = symbol_in_loaded_patch(pid, &patch, "anchor");
        let site_counter = symbol_in_loaded_patch(pid, &patch, "site_counter");
        let site_helper = symbol_in_loaded_patch(pid, &patch, "site_helper");
        let site_text = symbol_in_loaded_patch(pid, &patch, "site_text");
        let got = symbol_in_loaded_patch(pid, &patch, "__hotpatch_got");
        assert_eq!(
            read_u64(pid, site_counter),
            counter.wrapping_add_signed(COUNTER_ADDEND).wrapping_sub(anchor),
            "round {round}: site_counter"
        );
        assert_eq!(
            read_u64(pid, site_helper),
            helper_at.wrapping_sub(anchor),
            "round {round}: site_helper"
        );
        // The site in code, relative to the GOT: in an executable
        // mapping of the patch.
        assert_eq!(
            read_u64(pid, site_text),
            counter.wrapping_add_signed(COUNTER_ADDEND).wrapping_sub(got),
            "round {round}: site_text"
        );
        assert!(
            maps(pid).lines().any(|l| {
                let (range, rest) = l.split_once(' ').unwrap_or_default();
                let (start, end) = range.split_once('-').unwrap_or_default();
                let (start, end) = (
                    u64::from_str_radix(start, 16).unwrap_or(0),
                    u64::from_str_radix(end, 16).unwrap_or(0),
                );
                (start..end).contains(&site_text) && rest.starts_with("r-x")
            }),
            "site_text {site_text:#x} is not in code"
        );
        // The `ref` with an addend.
        assert_eq!(
            read_u64(pid, symbol_in_loaded_patch(pid, &patch, "counter_plus_8")),
            counter + 8,
            "round {round}: counter_plus_8"
        );
        // Farther than 2 GiB apart: only a 64-bit value reaches.
        assert!(anchor.abs_diff(counter) > 1 << 31, "{anchor:#x} {counter:#x}");

        // The patched code calls the static helper and increments the
        // target's own counter, from every worker.
        assert_eq!(target.call(5), 2 * helper(5));
        let start = target.counter();
        let moved = target.wait_for("patched calls under load", |c| c.patched > start.patched + 1000);
        assert_eq!(moved.bad, 0, "{moved:?}");
        // No original call since the flip: the low half is still (threads
        // that were inside the original when it flipped have left it by
        // the time the high half moved this much).
        assert_eq!(target.counter().original, moved.original, "round {round}");

        revert(pid, None);
        assert_eq!(target.call(5), helper(5));
        let reverted = target.counter();
        let after = target.wait_for("original calls after the revert", |c| {
            c.original > reverted.original + 1000
        });
        assert_eq!(target.counter().patched, after.patched, "round {round}");
        assert_eq!(after.bad, 0, "{after:?}");
    }
    assert!(target.proc.alive());
}

/// The bytes of `work` around its entry, as the process has them now.
fn work_code(pid: i32, exe: &Path) -> Vec<u8> {
    read_mem(pid, symbol_in_process(pid, exe, None, "work") - 8, 24)
}

#[test]
fn a_site_not_zero_or_a_missing_symbol_is_refused() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = build(dir.path());
    let mut target = Rel64Target::start(&exe, 2);
    let pid = target.pid();
    let code = work_code(pid, &exe);

    let not_zero = build_rel64_patch(
        dir.path(),
        "rel64_not_zero",
        &PATCH.replace(
            "long site_counter, site_helper;",
            "long site_counter = 0x1234, site_helper;",
        ),
    );
    let missing = build_rel64_patch(
        dir.path(),
        "rel64_missing",
        &PATCH.replace(
            "HOTPATCH_REL64(helper, site_helper",
            "HOTPATCH_REL64(no_such_helper, site_helper",
        ),
    );
    for (patch, needles) in [
        (
            &not_zero,
            vec![
                "`site_counter`",
                "expected 0000000000000000",
                "found 3412000000000000",
                "nothing written",
            ],
        ),
        (&missing, vec!["`no_such_helper`", "rel64_target"]),
    ] {
        let run = hotpatch(&["apply".to_string(), pid.to_string(), patch.display().to_string()]);
        let error = run.failure().to_string();
        eprintln!("{error}");
        for needle in needles {
            assert!(error.contains(needle), "`{needle}` not in: {error}");
        }
        // Nothing changed: no patch recorded or loaded, the code as it
        // was, the original still running.
        assert_eq!(listed_ids(pid), Vec::<u64>::new(), "{error}");
        assert_eq!(work_code(pid, &exe), code, "{error}");
        assert!(!maps(pid).contains("hotpatch-patch-"), "{error}");
        assert_eq!(target.call(7), helper(7));
        let c = target.counter();
        assert_eq!((c.patched, c.bad), (0, 0), "{c:?}");
    }
}
