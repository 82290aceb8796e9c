//! Pass-through patches of libc functions — unprepared code, reached by
//! a detour (a `jmp rel32` at the entry, the displaced instructions
//! relocated into a trampoline) — while a program hammers them from 8
//! threads plus its main thread, checking every result (`libc_hammer.c`;
//! two of the workers call only div and abs, so that the stops for the
//! detour writes often catch threads in or at those functions).
//!
//! Patch 1 replaces atoi, bsearch, div, rand_r, realloc and abs (no code
//! of libc calls them directly); each replacement counts the call and runs
//! the original through its trampoline. Under load: every call the program
//! makes goes through the replacement (the patch's counter, read from the
//! process's memory, keeps up with the program's own count), every result
//! is still libc's, revert stops the counting and restores libc's bytes
//! exactly, and a second apply/revert revives the dormant routes without
//! new memory (no new executable mapping, the same scratch use in `list`).
//!
//! Patch 2 replaces malloc, free and strtol, which code of libc calls
//! directly: refused without `--allow-direct-calls` (nothing changes),
//! applied with it, then reverted. The program keeps running correctly
//! throughout and exits cleanly when told to.

#[path = "common/live.rs"]
mod live;

use live::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const HAMMER_C: &str = include_str!("live/libc_hammer.c");
const PASSTHROUGH_C: &str = include_str!("live/libc_passthrough.c");
const ALLOC_PASSTHROUGH_C: &str = include_str!("live/libc_alloc_passthrough.c");

const WORKERS: usize = 8;
/// Patch 1's functions: no direct calls inside libc.
const PLAIN: [&str; 6] = ["abs", "atoi", "bsearch", "div", "rand_r", "realloc"];
/// Patch 2's functions: called directly from inside libc.
const ALLOC: [&str; 3] = ["free", "malloc", "strtol"];
/// Calls of each set per round of the hammer (`libc_hammer.c`).
const PLAIN_PER_ROUND: u64 = 7;
const ALLOC_PER_ROUND: u64 = 6;
/// Workers running tight rounds: div and abs only, `TIGHT_PER_ROUND` calls.
const TIGHT_WORKERS: u64 = 2;
const TIGHT_PER_ROUND: u64 = 512;
/// Calls of each set that rounds in flight may have made uncounted.
const PLAIN_IN_FLIGHT: u64 =
    TIGHT_WORKERS * TIGHT_PER_ROUND + (WORKERS as u64 - TIGHT_WORKERS) * PLAIN_PER_ROUND;
const ALLOC_IN_FLIGHT: u64 = (WORKERS as u64 - TIGHT_WORKERS) * ALLOC_PER_ROUND;
/// Bytes compared at each entry.
const ENTRY_BYTES: usize = 16;

/// What the hammer counted (`stats`).
#[derive(Debug, Clone)]
struct HammerStats {
    rounds: u64,
    plain: u64,
    alloc: u64,
    per: Vec<u64>,
}

/// A running `libc_hammer`.
struct Hammer {
    proc: Proc,
    /// The workers' thread ids.
    tids: Vec<i32>,
    /// libc entries of the functions it calls, as it prints them.
    entries: Vec<(String, u64)>,
    /// The longest [`Hammer::progressed`] waited for a slow worker.
    longest_wait: Duration,
}

impl Hammer {
    fn start(exe: &Path) -> Hammer {
        let mut proc = Proc::spawn(Command::new(exe).arg(WORKERS.to_string()));
        let ready = proc.line("ready", |l| l.starts_with("ready ") || l.starts_with("WRONG"));
        assert!(ready.starts_with("ready "), "{ready}");
        let tids = ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix("tids="))
            .expect("tids=")
            .split(',')
            .map(|t| t.parse().expect("thread id"))
            .collect();
        let entries = ready
            .split_whitespace()
            .filter_map(|w| {
                let (name, hex) = w.split_once("=0x")?;
                let addr = u64::from_str_radix(hex, 16).expect("hex address");
                Some((name.to_string(), addr))
            })
            .collect();
        let tight: u64 = ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix("tight="))
            .and_then(|n| n.parse().ok())
            .expect("tight=");
        assert_eq!(tight, TIGHT_WORKERS, "{ready}");
        Hammer {
            proc,
            tids,
            entries,
            longest_wait: Duration::ZERO,
        }
    }

    fn pid(&self) -> i32 {
        self.proc.pid()
    }

    fn entry(&self, name: &str) -> u64 {
        self.entries
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("the hammer printed no entry of {name}"))
            .1
    }

    /// The main thread makes one checked round of calls, then reports.
    /// Panics if any thread saw a wrong result (the hammer prints it and
    /// exits).
    fn stats(&mut self) -> HammerStats {
        self.proc.send("stats");
        let l = self
            .proc
            .line("stats", |l| l.starts_with("stats ") || l.starts_with("WRONG"));
        assert!(l.starts_with("stats "), "the hammer saw a wrong result: {l}");
        let field = |key: &str| -> &str {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .unwrap_or_else(|| panic!("no {key} in {l:?}"))
        };
        let num = |key: &str| -> u64 {
            field(key)
                .parse()
                .unwrap_or_else(|_| panic!("bad {key} in {l:?}"))
        };
        HammerStats {
            rounds: num("rounds="),
            plain: num("plain="),
            alloc: num("alloc="),
            per: field("per=")
                .split(',')
                .map(|n| n.parse().expect("rounds per worker"))
                .collect(),
        }
    }

    /// `ENTRY_BYTES` bytes at the entry of each of `names`.
    fn code(&mut self, names: &[&str]) -> Vec<Vec<u8>> {
        names
            .iter()
            .map(|n| self.read(self.entry(n), ENTRY_BYTES))
            .collect()
    }

    /// Stats once every worker has made rounds since `since`, waiting up
    /// to 10 s (on a 2-core machine loaded by other tests, a busy thread of
    /// the unpatched hammer was seen starved for 3 s); panics naming the
    /// workers that made none, with their state.
    fn progressed(&mut self, since: &HammerStats, what: &str) -> HammerStats {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(10);
        loop {
            let now = self.stats();
            assert_eq!(now.per.len(), WORKERS, "{now:?}");
            let stuck: Vec<usize> = (0..WORKERS).filter(|&t| now.per[t] <= since.per[t]).collect();
            if stuck.is_empty() {
                self.longest_wait = self.longest_wait.max(started.elapsed());
                return now;
            }
            if Instant::now() > deadline {
                let states: Vec<String> = stuck.iter().map(|&t| self.thread_state(t)).collect();
                panic!("{what}: workers stuck for 10 s: {states:#?}\nbefore: {since:?}\nnow: {now:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `len` bytes at `addr` of the hammer, through `/proc/PID/mem`; if
    /// that fails, the hammer's own account of why it died.
    fn read(&mut self, addr: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0; len];
        let read = std::fs::File::open(format!("/proc/{}/mem", self.pid()))
            .and_then(|f| f.read_exact_at(&mut buf, addr));
        match read {
            Ok(()) => buf,
            Err(e) => self.died(&format!("reading {len} bytes at {addr:#x}: {e}")),
        }
    }

    /// Panic with `what` and what the hammer printed last.
    fn died(&mut self, what: &str) -> ! {
        std::thread::sleep(Duration::from_millis(200));
        self.proc.drain();
        let status = self.proc.child.try_wait();
        panic!(
            "{what}; the hammer: {status:?}, last lines {:?}",
            self.proc.seen.iter().rev().take(5).collect::<Vec<_>>()
        )
    }

    /// `hotpatch COMMAND PID ARGS… --json` on the hammer, which must
    /// succeed; if it fails, the hammer's own account (a wrong result, or
    /// its exit) comes with the tool's message.
    fn tool(&mut self, args: &[&str]) -> Value {
        let mut all = vec![args[0].to_string(), self.pid().to_string()];
        all.extend(args[1..].iter().map(|a| a.to_string()));
        all.push("--json".to_string());
        let run = hotpatch(&all);
        if run.code() != 0 {
            self.died(&format!("hotpatch {all:?} failed: {}", run.stderr.trim_end()));
        }
        run.json()
    }

    /// Returns once every call a worker was making when this was called
    /// has returned: each has finished a round since (a worker counts a
    /// round after its calls, one round after the other). After a revert,
    /// no replacement can run from then on.
    fn settle(&mut self, what: &str) {
        let now = self.stats();
        self.progressed(&now, what);
    }

    /// Worker `t`'s state, system call and wait channel, from `/proc`.
    fn thread_state(&self, t: usize) -> String {
        let task = format!("/proc/{}/task/{}", self.pid(), self.tids[t]);
        let read = |f: &str| std::fs::read_to_string(format!("{task}/{f}")).unwrap_or_default();
        let stat = read("stat");
        let state = stat
            .rsplit_once(')')
            .map_or("?", |(_, r)| r.trim_start().get(..1).unwrap_or("?"));
        format!(
            "worker {t} (tid {}): state {state}, syscall {}, wchan {}",
            self.tids[t],
            read("syscall").trim(),
            read("wchan")
        )
    }
}

/// A patch's `long` counter in the process: its address, from `readelf`
/// and `/proc/PID/maps`.
struct Counter {
    at: u64,
}

impl Counter {
    /// In the copy of `patch` the newest patch record loaded.
    fn find(pid: i32, patch: &Path, symbol: &str) -> Counter {
        Counter {
            at: symbol_in_loaded_patch(pid, patch, symbol),
        }
    }

    fn read(&self, hammer: &mut Hammer) -> u64 {
        u64::from_le_bytes(hammer.read(self.at, 8).try_into().expect("8 bytes"))
    }
}

/// One measurement window of `dur`: (replacement calls counted by the
/// patch, calls of the set the hammer made), the counter read outside the
/// hammer's two reports.
fn window(
    hammer: &mut Hammer,
    counter: &Counter,
    dur: Duration,
    calls: fn(&HammerStats) -> u64,
    what: &str,
) -> (u64, u64) {
    let c0 = counter.read(hammer);
    let s0 = hammer.stats();
    std::thread::sleep(dur);
    let s1 = hammer.progressed(&s0, what);
    let c1 = counter.read(hammer);
    (c1 - c0, calls(&s1) - calls(&s0))
}

/// With the patch in: the patch counted at least every call the hammer
/// made (less the rounds in flight when the window opened: the hammer
/// counts a round once it is done). Returns (replaced, calls).
fn assert_replaced(
    hammer: &mut Hammer,
    counter: &Counter,
    dur: Duration,
    calls: fn(&HammerStats) -> u64,
    in_flight: u64,
    what: &str,
) -> (u64, u64) {
    let (replaced, made) = window(hammer, counter, dur, calls, what);
    assert!(made > 0, "{what}: the hammer made no calls");
    assert!(
        replaced + in_flight >= made,
        "{what}: the hammer made {made} calls, the replacements counted only {replaced}"
    );
    (replaced, made)
}

/// With the patch reverted: the counter does not move while the hammer
/// keeps calling. Returns the calls made meanwhile.
fn assert_not_replaced(
    hammer: &mut Hammer,
    counter: &Counter,
    dur: Duration,
    calls: fn(&HammerStats) -> u64,
    what: &str,
) -> u64 {
    let (replaced, made) = window(hammer, counter, dur, calls, what);
    assert!(made > 0, "{what}: the hammer made no calls");
    assert_eq!(replaced, 0, "{what}: replacements still ran after the revert");
    made
}

/// The executable mappings of `pid` (range, permissions, file).
/// Executable mappings other than patch libraries (each apply loads its
/// own copy of the patch, by content: see `live_content.rs`).
fn exec_mappings(pid: i32) -> BTreeSet<String> {
    maps(pid)
        .lines()
        .filter(|l| l.split_whitespace().nth(1).is_some_and(|p| p.contains('x')))
        .filter(|l| !l.contains("/memfd:hotpatch-patch-"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            format!("{} {} {}", f[0], f[1], f.get(5).unwrap_or(&""))
        })
        .collect()
}

/// The mapping of `pid` containing `addr`: (permissions, file).
fn mapping_of(pid: i32, addr: u64) -> Option<(String, String)> {
    maps(pid).lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (lo, hi) = f[0].split_once('-')?;
        let lo = u64::from_str_radix(lo, 16).ok()?;
        let hi = u64::from_str_radix(hi, 16).ok()?;
        (lo <= addr && addr < hi).then(|| (f[1].to_string(), f.get(5).unwrap_or(&"").to_string()))
    })
}

/// An apply's JSON: exactly `names`, at the hammer's entries, each by a
/// detour written with every thread stopped; each entry now starts with a
/// `jmp rel32` into executable memory outside libc's own code. Returns the
/// patch id and the longest stop.
fn check_applied(hammer: &mut Hammer, applied: &Value, names: &[&str], libc: &str) -> (u64, u64) {
    let pid = hammer.pid();
    let functions = applied["functions"].as_array().expect("functions[]");
    let mut got: Vec<&str> = functions
        .iter()
        .map(|f| f["name"].as_str().expect("name"))
        .collect();
    got.sort_unstable();
    assert_eq!(got, names, "{applied}");
    let mut longest_stop = 0;
    for f in functions {
        let name = f["name"].as_str().unwrap();
        assert_eq!(
            f["entry"].as_u64(),
            Some(hammer.entry(name)),
            "entry of {name}: {f}"
        );
        assert_eq!(f["route"], "detour", "{f}");
        assert_eq!(
            f["mode"], "stopped",
            "a detour is written with every thread stopped: {f}"
        );
        longest_stop = longest_stop.max(f["stopped_us"].as_u64().expect("stopped_us"));
        let code = hammer.read(hammer.entry(name), 5);
        assert_eq!(code[0], 0xe9, "{name} does not start with jmp rel32: {code:02x?}");
        let rel = i32::from_le_bytes(code[1..5].try_into().unwrap());
        let to = hammer.entry(name).wrapping_add(5).wrapping_add(rel as i64 as u64);
        let (perms, file) =
            mapping_of(pid, to).unwrap_or_else(|| panic!("{name} jumps to {to:#x}, which nothing maps"));
        assert!(
            perms.contains('x'),
            "{name} jumps to {to:#x}, in a {perms} mapping of {file:?}"
        );
        assert_ne!(file, libc, "{name} jumps to {to:#x}, inside libc");
    }
    assert_no_thread_stopped(pid);
    (applied["patch"]["id"].as_u64().expect("patch id"), longest_stop)
}

/// A revert's JSON: patch `id` reverted, every one of `names` back to its
/// original code (none stepped back to an older patch).
/// `hotpatch revert PID WHICH`: patch `id` goes, `names` are restored
/// (not stepped back), and once every worker finished a round, libc's
/// entries of `names` are `before` again.
fn revert_restores(
    hammer: &mut Hammer,
    which: &str,
    id: u64,
    names: &[&str],
    before: &[Vec<u8>],
    what: &str,
) {
    assert_restored(&hammer.tool(&["revert", which]), id, names);
    hammer.settle(what);
    assert_eq!(hammer.code(names), before, "libc's entries: {what}");
}

fn assert_restored(reverted: &Value, id: u64, names: &[&str]) {
    let reverted = reverted["reverted"]
        .as_array()
        .expect("revert --json: reverted[]");
    assert_eq!(reverted.len(), 1, "{reverted:?}");
    assert_eq!(reverted[0]["patch"].as_u64(), Some(id), "{reverted:?}");
    let mut restored: Vec<&str> = reverted[0]["restored"]
        .as_array()
        .expect("restored[]")
        .iter()
        .map(|n| n.as_str().expect("name"))
        .collect();
    restored.sort_unstable();
    assert_eq!(restored, names, "{reverted:?}");
    assert_eq!(reverted[0]["stepped_back"], serde_json::json!([]), "{reverted:?}");
}

/// `hotpatch check LIBC --functions --json`: the premise of the test —
/// every function here is detourable; patch 1's have no direct calls from
/// inside libc, patch 2's have some.
fn check_premise(libc: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_hotpatch"))
        .args(["check", libc, "--functions", "--json"])
        .output()
        .expect("run hotpatch check");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).expect("check --json");
    let functions = report["images"][0]["functions"].as_array().expect("functions[]");
    for name in PLAIN.iter().chain(&ALLOC) {
        let f = functions
            .iter()
            .find(|f| {
                f["symbols"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|s| s == name))
            })
            .unwrap_or_else(|| panic!("{libc} has no function {name}"));
        assert_eq!(f["class"], "detourable", "{libc}: {f}");
        let direct = f["direct_calls"].as_u64().expect("direct_calls");
        if ALLOC.contains(name) {
            assert!(
                direct > 0,
                "{libc}: {name} was expected to be called directly: {f}"
            );
        } else {
            assert_eq!(direct, 0, "{libc}: {f}");
        }
    }
}

#[test]
fn pass_through_libc_under_load() {
    let _serial = serial();
    let t0 = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("libc_hammer.c"), HAMMER_C).expect("write libc_hammer.c");
    // No padding flags: nothing of the hammer is prepared, nor of libc.
    compile(
        "gcc",
        &["-O2", "-pthread", "-o", "libc_hammer", "libc_hammer.c"],
        dir.path(),
    );
    let exe: PathBuf = dir.path().join("libc_hammer");
    let plain_patch = build_patch(dir.path(), "libc_passthrough", PASSTHROUGH_C);
    let alloc_patch = build_patch(dir.path(), "libc_alloc_passthrough", ALLOC_PASSTHROUGH_C);

    let mut hammer = Hammer::start(&exe);
    let pid = hammer.pid();
    let (_, libc) = mapping_of(pid, hammer.entry("atoi")).expect("atoi mapped");
    assert!(libc.ends_with("/libc.so.6"), "atoi is in {libc:?}");
    check_premise(&libc);
    let plain_before = hammer.code(&PLAIN);
    let alloc_before = hammer.code(&ALLOC);
    let s = hammer.stats();
    std::thread::sleep(Duration::from_millis(100));
    hammer.progressed(&s, "before any patch");
    let pick_plain: fn(&HammerStats) -> u64 = |s| s.plain;
    let pick_alloc: fn(&HammerStats) -> u64 = |s| s.alloc;
    let window_len = Duration::from_millis(500);
    let mut report = Vec::new();

    // ---- patch 1: apply under load.
    let applied = hammer.tool(&["apply", &plain_patch.display().to_string()]);
    let (id1, stop1) = check_applied(&mut hammer, &applied, &PLAIN, &libc);
    assert_eq!(listed_ids(pid), [id1]);
    let plain_counter = Counter::find(pid, &plain_patch, "passthrough_calls");
    let (replaced, made) = assert_replaced(
        &mut hammer,
        &plain_counter,
        window_len,
        pick_plain,
        PLAIN_IN_FLIGHT,
        "patch 1 applied",
    );
    report.push(format!(
        "patch 1 applied ({} µs, longest stop {stop1} µs): {made} calls, {replaced} replaced",
        applied["elapsed_us"]
    ));

    // Revert: the counting stops, libc's bytes are back.
    revert_restores(
        &mut hammer,
        &id1.to_string(),
        id1,
        &PLAIN,
        &plain_before,
        "patch 1 reverted",
    );
    let made = assert_not_replaced(
        &mut hammer,
        &plain_counter,
        window_len,
        pick_plain,
        "patch 1 reverted",
    );
    report.push(format!("patch 1 reverted: {made} calls, none replaced"));

    // Apply again: the dormant routes are revived — no new code mapped,
    // no scratch space used (`list` shows what the tool allocated).
    let exec_before = exec_mappings(pid);
    let scratch_before = list(pid)["scratch"].clone();
    assert!(
        scratch_before.is_array(),
        "list shows no scratch: {scratch_before}"
    );
    let applied = hammer.tool(&["apply", &plain_patch.display().to_string()]);
    let (id2, stop2) = check_applied(&mut hammer, &applied, &PLAIN, &libc);
    assert_eq!(listed_ids(pid), [id2]);
    let reused = "the second apply used new memory instead of the dormant routes";
    assert_eq!(exec_mappings(pid), exec_before, "{reused}");
    assert_eq!(list(pid)["scratch"], scratch_before, "{reused}");
    let plain_counter = Counter::find(pid, &plain_patch, "passthrough_calls");
    let (replaced, made) = assert_replaced(
        &mut hammer,
        &plain_counter,
        window_len,
        pick_plain,
        PLAIN_IN_FLIGHT,
        "patch 1 applied again",
    );
    report.push(format!(
        "patch 1 applied again ({} µs, longest stop {stop2} µs): {made} calls, {replaced} replaced",
        applied["elapsed_us"]
    ));
    revert_restores(
        &mut hammer,
        "--all",
        id2,
        &PLAIN,
        &plain_before,
        "patch 1 reverted again",
    );
    assert_eq!(exec_mappings(pid), exec_before, "after the second cycle");
    assert_eq!(list(pid)["scratch"], scratch_before, "after the second cycle");
    assert_eq!(listed_ids(pid), Vec::<u64>::new());
    let made = assert_not_replaced(
        &mut hammer,
        &plain_counter,
        window_len,
        pick_plain,
        "patch 1 reverted again",
    );
    report.push(format!("patch 1 reverted again: {made} calls, none replaced"));

    // ---- patch 2: refused without --allow-direct-calls, nothing changed.
    let scratch_before = list(pid)["scratch"].clone();
    let refused = hotpatch(&[
        "apply".to_string(),
        pid.to_string(),
        alloc_patch.display().to_string(),
        "--json".to_string(),
    ]);
    let message = refused.failure();
    for name in ALLOC {
        assert!(
            message.contains(name),
            "the refusal does not name {name}: {message}"
        );
    }
    assert!(message.contains("--allow-direct-calls"), "{message}");
    assert_eq!(hammer.code(&ALLOC), alloc_before, "a refused apply changed libc");
    assert_eq!(hammer.code(&PLAIN), plain_before, "a refused apply changed libc");
    assert!(!maps_file(pid, &alloc_patch), "a refused patch was loaded");
    assert_eq!(exec_mappings(pid), exec_before, "a refused apply mapped code");
    assert_eq!(
        list(pid)["scratch"],
        scratch_before,
        "a refused apply used scratch"
    );
    assert_eq!(listed_ids(pid), Vec::<u64>::new());
    let s = hammer.stats();
    std::thread::sleep(Duration::from_millis(100));
    hammer.progressed(&s, "patch 2 refused");
    report.push(format!("patch 2 refused: {message}"));

    // With the flag: applied under load, every malloc/free/strtol call of
    // the hammer goes through the replacements.
    let plain_calls_before = plain_counter.read(&mut hammer);
    let applied = hammer.tool(&[
        "apply",
        &alloc_patch.display().to_string(),
        "--allow-direct-calls",
    ]);
    let (id3, stop3) = check_applied(&mut hammer, &applied, &ALLOC, &libc);
    assert_eq!(listed_ids(pid), [id3]);
    let alloc_counter = Counter::find(pid, &alloc_patch, "alloc_calls");
    let (replaced, made) = assert_replaced(
        &mut hammer,
        &alloc_counter,
        Duration::from_millis(1500),
        pick_alloc,
        ALLOC_IN_FLIGHT,
        "patch 2 applied",
    );
    // Patch 1 stayed out meanwhile.
    assert_eq!(
        plain_counter.read(&mut hammer),
        plain_calls_before,
        "patch 1 came back"
    );
    report.push(format!(
        "patch 2 applied with --allow-direct-calls ({} µs, longest stop {stop3} µs): {made} calls, \
         {replaced} replaced (libc's own calls included)",
        applied["elapsed_us"]
    ));
    revert_restores(
        &mut hammer,
        &id3.to_string(),
        id3,
        &ALLOC,
        &alloc_before,
        "patch 2 reverted",
    );
    assert_eq!(hammer.code(&PLAIN), plain_before);
    assert_eq!(listed_ids(pid), Vec::<u64>::new());
    let made = assert_not_replaced(
        &mut hammer,
        &alloc_counter,
        window_len,
        pick_alloc,
        "patch 2 reverted",
    );
    report.push(format!("patch 2 reverted: {made} calls, none replaced"));

    // The hammer is still correct and exits cleanly.
    let last = hammer.stats();
    hammer.proc.send("quit");
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = hammer.proc.child.try_wait().expect("wait for the hammer") {
            break s;
        }
        assert!(Instant::now() < deadline, "the hammer did not exit on quit");
        std::thread::sleep(Duration::from_millis(5));
    };
    hammer.proc.drain();
    let wrong: Vec<&String> = hammer
        .proc
        .seen
        .iter()
        .filter(|l| l.starts_with("WRONG"))
        .collect();
    assert!(wrong.is_empty(), "{wrong:?}");
    assert!(status.success(), "the hammer exited with {status}");
    for line in &report {
        eprintln!("{line}");
    }
    eprintln!(
        "hammer: {} rounds, {} plain calls, {} alloc calls, all checked; longest wait for a \
         slow worker {:.1?}; total {:.1?}",
        last.rounds,
        last.plain,
        last.alloc,
        hammer.longest_wait,
        t0.elapsed()
    );
}
