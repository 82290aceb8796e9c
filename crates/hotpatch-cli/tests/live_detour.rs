//! Unprepared functions (no padding): `apply` detours them with a 5-byte
//! jump written while every thread is stopped, never while a thread could
//! resume inside the bytes it overwrites. Under load from many threads:
//! stacking, revert, revival of a dormant detour, the original called
//! through the trampoline; threads parked inside the first bytes; and the
//! refusals (too small, a branch into the first bytes, an instruction with
//! no relocatable form), each leaving the code bytes as they were.

#[path = "common/live.rs"]
mod live;

use live::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

const DETOUR_TARGET_C: &str = include_str!("live/detour_target.c");
const FLAG: &str = "--allow-direct-calls";

/// Every function of an apply's JSON was detoured, with threads stopped.
fn assert_detoured(applied: &Value, mode: &str) {
    let functions = applied["functions"].as_array().expect("functions[]");
    assert!(!functions.is_empty(), "{applied}");
    for f in functions {
        assert_eq!(f["route"], "detour", "{f}");
        assert_eq!(f["mode"], mode, "{f}");
    }
}

/// The same bytes from the entry on as before: a revert restores every
/// byte the detour overwrote.
fn entry_bytes(pid: i32, entries: &[u64]) -> Vec<Vec<u8>> {
    entries.iter().map(|&e| read_mem(pid, e, 16)).collect()
}

/// target.c's f and g, built without padding by gcc and by clang with
/// endbr64 (the jump goes after it), under load from 8 workers: every call
/// after an apply or revert returns runs the expected version, and no call
/// ever returns anything else.
#[test]
fn unprepared_functions_under_load() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let a = build_patch(d, "patch_a", PATCH_A_C);
    let b = build_patch(d, "patch_b", PATCH_B_C);
    for (cc, extra) in [("gcc", &[][..]), ("clang", &["-fcf-protection=full"][..])] {
        let exe = build_unprepared(d, cc, &format!("target_{cc}"), TARGET_C, extra);
        let mut target = Target::start(&exe, 8, None, Workers::Busy);
        let pid = target.pid();
        let entries = [target.f, target.g];
        let original = entry_bytes(pid, &entries);
        target.expect(-1);

        // Before each change any version goes; once the tool returned,
        // only the new one.
        let step = |target: &mut Target, version: i32, change: &dyn Fn() -> Value| {
            target.expect(-1);
            let out = change();
            target.expect(version);
            out
        };
        let applied_a = step(&mut target, 1, &|| apply(pid, &a, &[FLAG]));
        assert_detoured(&applied_a, "stopped");
        let id_a = applied_a["patch"]["id"].as_u64().expect("id");
        assert_eq!(target.version(), (1, 1), "{cc}: A runs");
        if cc == "clang" {
            // endbr64 stays: the jump is right after it.
            for e in entries {
                let code = read_mem(pid, e, 9);
                assert_eq!(&code[..4], &[0xf3, 0x0f, 0x1e, 0xfa], "{cc}: {code:02x?}");
                assert_eq!(code[4], 0xe9, "{cc}: {code:02x?}");
            }
        }

        // Stacked: B supersedes A with one slot store; reverting B steps back.
        let applied_b = step(&mut target, 2, &|| apply(pid, &b, &[FLAG]));
        assert_detoured(&applied_b, "superseded");
        let id_b = applied_b["patch"]["id"].as_u64().expect("id");
        step(&mut target, 1, &|| revert(pid, Some(id_b)));
        step(&mut target, 0, &|| revert(pid, Some(id_a)));
        assert_eq!(
            entry_bytes(pid, &entries),
            original,
            "{cc}: revert restores every byte"
        );

        // The dormant detour comes back to life: its route is reused.
        let revived = step(&mut target, 2, &|| apply(pid, &b, &[FLAG]));
        assert_detoured(&revived, "stopped");
        step(&mut target, 0, &|| revert(pid, None));
        assert_eq!(entry_bytes(pid, &entries), original, "{cc}: after the revival");
        assert_eq!(listed_ids(pid), Vec::<u64>::new());

        let stats = target.stats();
        assert_eq!((stats.bad, stats.late), (0, 0), "{cc}: {stats:?}");
        assert!(stats.a > 0 && stats.b > 0 && stats.old > 0, "{cc}: {stats:?}");
        assert!(target.proc.alive(), "{cc}: the target died");
    }
}

/// The target of [`DETOUR_TARGET_C`].
struct Detoured {
    proc: Proc,
    spin: u64,
    parked: u64,
    tiny: u64,
    loopy: u64,
    jrcxz: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    spin_old: u64,
    spin_new: u64,
    parked_old: u64,
    parked_new: u64,
    bad: u64,
}

fn field(line: &str, key: &str) -> u64 {
    let v = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"));
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    }
    .unwrap_or_else(|_| panic!("bad {key} in {line:?}"))
}

impl Detoured {
    fn start(exe: &Path) -> Detoured {
        let mut proc = Proc::spawn(&mut Command::new(exe));
        let l = proc.line("ready", |l| l.starts_with("ready "));
        Detoured {
            spin: field(&l, "spin="),
            parked: field(&l, "parked="),
            tiny: field(&l, "tiny="),
            loopy: field(&l, "loopy="),
            jrcxz: field(&l, "jrcxz="),
            proc,
        }
    }

    fn pid(&self) -> i32 {
        self.proc.pid()
    }

    fn ask(&mut self, command: &str) -> String {
        self.proc.send(command);
        let word = command.split_whitespace().next().unwrap_or(command).to_string();
        let answer = if word == "release" {
            "released".to_string()
        } else {
            word
        };
        self.proc.line(&answer, |l| l.starts_with(&answer))
    }

    fn counts(&mut self) -> Counts {
        let l = self.ask("stats");
        Counts {
            spin_old: field(&l, "spin_old="),
            spin_new: field(&l, "spin_new="),
            parked_old: field(&l, "parked_old="),
            parked_new: field(&l, "parked_new="),
            bad: field(&l, "bad="),
        }
    }

    /// Counts from now on, once `enough` holds for them (polled, at most
    /// [`WAIT`]): enough calls made to judge what they returned.
    fn counts_until(&mut self, enough: impl Fn(&Counts) -> bool) -> Counts {
        self.ask("reset");
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let c = self.counts();
            if enough(&c) || c.bad > 0 {
                return c;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the target made too few calls in {WAIT:?}: {c:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    fn code(&self) -> Vec<Vec<u8>> {
        entry_bytes(
            self.pid(),
            &[self.spin, self.parked, self.tiny, self.loopy, self.jrcxz],
        )
    }
}

const SPIN_PATCH_C: &str = r#"
#include "hotpatch.h"
/* spin(x) = x + 1; patched: the original, through the trampoline, plus 1. */
HOTPATCH_ORIGINAL(long, spin, (long));
long spin_new(long x) { return orig_spin(x) + 1; }
HOTPATCH_REPLACE(spin, spin_new);
"#;

const PARKED_PATCH_C: &str = r#"
#include "hotpatch.h"
long parked_new(long (*f)(void)) { return f() + 1000; }
HOTPATCH_REPLACE(parked, parked_new);
"#;

/// A thread blocked with a return address inside the bytes a detour would
/// overwrite: apply retries, then gives up naming the thread, and nothing
/// changed. Threads spinning through the first bytes: apply retries until
/// none is inside. Once the parked thread moved on, its function detours.
#[test]
fn threads_inside_the_first_bytes() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let exe = build_unprepared(d, "gcc", "detour_target", DETOUR_TARGET_C, &[]);
    let spin_patch = build_patch(d, "spin_patch", SPIN_PATCH_C);
    let parked_patch = build_patch(d, "parked_patch", PARKED_PATCH_C);
    let mut target = Detoured::start(&exe);
    let pid = target.pid();
    let original = target.code();

    // parked+3, the return address of `call *%rdi`, is on the parked
    // thread's stack for as long as it stays blocked.
    let args = [
        "apply".to_string(),
        pid.to_string(),
        parked_patch.display().to_string(),
        FLAG.to_string(),
    ];
    let run = hotpatch(&args);
    let msg = run.failure();
    assert!(
        msg.contains("on its stack") && msg.contains(&format!("{:#x}", target.parked + 3)),
        "{msg}"
    );
    assert!(
        msg.contains("thread ") && msg.contains("nothing written"),
        "{msg}"
    );
    assert_eq!(target.code(), original, "a refused detour changed code");
    let c = target.counts_until(|c| c.spin_old >= 1000);
    assert_eq!(c.bad, 0, "{c:?}");

    // The spinners are inside spin's nops most of the time.
    let applied = apply(pid, &spin_patch, &[FLAG]);
    assert_detoured(&applied, "stopped");
    let c = target.counts_until(|c| c.spin_new >= 1000);
    // Only a call that began before `reset` may still return the old value.
    assert!(c.spin_old <= 3 && c.bad == 0, "{c:?}");

    // Released, the parked thread calls parked(quick) in a loop.
    target.ask("release");
    let applied = apply(pid, &parked_patch, &[FLAG]);
    assert_detoured(&applied, "stopped");
    let c = target.counts_until(|c| c.parked_new >= 20);
    assert!(c.parked_old <= 1 && c.bad == 0, "{c:?}");

    revert(pid, None);
    let c = target.counts_until(|c| c.spin_old >= 1000 && c.parked_old >= 20);
    assert!(c.spin_new <= 3 && c.parked_new <= 1, "{c:?}");
    assert_eq!(c.bad, 0, "{c:?}");
    assert_eq!(target.code(), original);
    assert!(target.proc.alive());
}

/// Functions a detour cannot take: a clear reason, exit code 1, the code
/// bytes unchanged, and the functions still computing what they did.
#[test]
fn detour_refusals() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let exe = build_unprepared(d, "gcc", "detour_target", DETOUR_TARGET_C, &[]);
    let plain = d.join("plain.c");
    std::fs::write(&plain, "long repl(long x) { return x; }\nlong (*p)(long);\n").expect("write");
    compile(
        "gcc",
        &["-O2", "-shared", "-fPIC", "-o", "plain.so", "plain.c"],
        d,
    );
    let patch = d.join("plain.so");
    let mut target = Detoured::start(&exe);
    let pid = target.pid();
    let original = target.code();
    let calls = target.ask("call");
    assert_eq!(calls, "call tiny=0 loopy=5 jrcxz=7");

    let cases: [(&[&str], &[&str]); 4] = [
        (&["--replace", "tiny=repl"], &["`tiny`", "3 bytes, too small"]),
        (
            &["--replace", "loopy=repl"],
            &["`loopy`", "a branch targets", "inside the"],
        ),
        (
            &["--replace", "jrcxz_first=repl"],
            &["`jrcxz_first`", "jrcxz", "cannot be relocated"],
        ),
        // The original of an unprepared function exists only once detoured.
        (
            &["--replace", "spin=repl", "--orig", "parked=p", FLAG],
            &["`orig` of `parked`", "ref"],
        ),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["apply".to_string(), pid.to_string(), patch.display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let run = hotpatch(&args);
        let msg = run.failure();
        for e in expected {
            assert!(msg.contains(e), "{extra:?}: {msg:?} does not say {e:?}");
        }
        assert_eq!(target.code(), original, "{extra:?} changed code: {msg}");
        assert!(
            !maps_file(pid, &patch),
            "{extra:?}: the patch stays mapped: {msg}"
        );
    }
    assert_eq!(target.ask("call"), calls);
    assert_eq!(listed_ids(pid), Vec::<u64>::new());
    let c = target.counts();
    assert_eq!(c.bad, 0, "{c:?}");
}
