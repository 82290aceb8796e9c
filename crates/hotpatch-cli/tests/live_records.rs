//! The record of what is applied, kept inside each process: one record
//! per process across `fork`, a record left all zeros by a killed tool,
//! records that disagree with the code, and the locks that keep two tools
//! apart.

#[path = "common/live.rs"]
mod live;

use live::*;
use std::collections::BTreeMap;
use std::process::Command;

/// What `f(11)` and `g(11)` are in version `v` (0 original, 1 A, 2 B).
fn version_values(v: u8) -> (i64, i64) {
    (f_version(v, 11), g_version(v, 11))
}

/// The running forking server: its master, and the workers of its last
/// (re)load.
struct Forking {
    master: Proc,
    workers: Vec<i32>,
}

impl Forking {
    fn start(exe: &std::path::Path, workers: usize, args: &[&str]) -> Forking {
        let mut master = Proc::spawn(Command::new(exe).arg(workers.to_string()).args(args));
        master.line("ready", |l| l.starts_with("ready "));
        let mut s = Forking {
            master,
            workers: Vec::new(),
        };
        s.read_workers();
        s
    }

    fn pid(&self) -> i32 {
        self.master.pid()
    }

    fn read_workers(&mut self) {
        let l = self.master.line("workers", |l| l.starts_with("workers "));
        self.workers = l
            .split_whitespace()
            .skip(1)
            .map(|p| p.parse().expect("worker pid"))
            .collect();
    }

    /// SIGHUP: the master forks a new set of workers.
    fn reload(&mut self) {
        let out = Command::new("kill")
            .args(["-HUP", &self.pid().to_string()])
            .output()
            .expect("run kill");
        assert!(out.status.success(), "kill -HUP: {out:?}");
        self.read_workers();
    }

    /// `(f(11), g(11))` as computed now by the master and each worker.
    fn values(&mut self) -> BTreeMap<i32, (i64, i64)> {
        self.master.send("values");
        let mut want: Vec<i32> = self.workers.clone();
        want.push(self.pid());
        let mut got = BTreeMap::new();
        while got.len() < want.len() {
            let l = self
                .master
                .line("a value of every process", |l| l.starts_with("value "));
            let mut w = l.split_whitespace().skip(1);
            let pid: i32 = w.next().and_then(|p| p.parse().ok()).expect("pid");
            let field = |s: Option<&str>, k: &str| -> i64 {
                s.and_then(|s| s.strip_prefix(k))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("bad line {l:?}"))
            };
            let f = field(w.next(), "f=");
            let g = field(w.next(), "g=");
            if want.contains(&pid) {
                got.insert(pid, (f, g));
            }
        }
        got
    }

    /// Every process computes version `master` (the master) or
    /// `workers[i]` (worker i).
    fn check(&mut self, master: u8, workers: &[u8], when: &str) {
        let values = self.values();
        assert_eq!(values[&self.pid()], version_values(master), "{when}: the master");
        for (w, &v) in self.workers.iter().zip(workers) {
            assert_eq!(values[w], version_values(v), "{when}: worker {w}");
        }
    }
}

/// A pre-forking server: a patch applied to the master before a reload is
/// inherited by the new workers, code and record; from then on each
/// process lists, reverts and re-applies its own patches.
#[test]
fn each_forked_process_owns_its_record() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let exe = build_target(d, "gcc", "forking", FORKING_C, &[]);
    let patch_a = build_patch(d, "patch_a", PATCH_A_C);
    let patch_b = build_patch(d, "patch_b", PATCH_B_C);
    let mut server = Forking::start(&exe, 2, &[]);
    let master = server.pid();
    let f = symbol_in_process(master, &exe, None, "f");
    let g = symbol_in_process(master, &exe, None, "g");
    let original = [code_bytes(master, f), code_bytes(master, g)].concat();
    server.check(0, &[0, 0], "at start");

    // Workers forked before the apply keep their own, original, code.
    let old_workers = server.workers.clone();
    let shared = |pid: i32| -> Vec<String> {
        maps(pid)
            .lines()
            .filter(|l| l.split_whitespace().nth(1).is_some_and(|p| p.ends_with('s')))
            .map(str::to_string)
            .collect()
    };
    let shared_before = shared(master);
    apply(master, &patch_a, &[]);
    // Nothing the tool maps (record, scratch, call region) is shared.
    assert_eq!(
        shared(master),
        shared_before,
        "new shared mappings after the apply"
    );
    assert_eq!(listed_ids(master), [1]);
    server.check(1, &[0, 0], "after apply on the master");
    for &w in &old_workers {
        assert_eq!(
            listed_ids(w),
            Vec::<u64>::new(),
            "worker {w} forked before the apply"
        );
    }
    let (_, private) = state_mapping(master).expect("a state record");
    assert!(private, "the state record is mapped shared:\n{}", maps(master));

    // Reload: the new workers inherit the patched code and its record.
    server.reload();
    assert_ne!(server.workers, old_workers);
    server.check(1, &[1, 1], "after the reload");
    for &w in &server.workers {
        assert_eq!(listed_ids(w), [1], "worker {w} forked after the apply");
    }

    // Revert the master: its workers keep their patch and its record.
    revert(master, None);
    assert_eq!(listed_ids(master), Vec::<u64>::new());
    check_reverted(
        &[code_bytes(master, f), code_bytes(master, g)].concat(),
        &original,
    )
    .expect("the master reverted");
    server.check(0, &[1, 1], "after reverting the master");
    for &w in &server.workers {
        assert_eq!(listed_ids(w), [1], "worker {w} after the master's revert");
    }

    // Each worker reverts on its own.
    let workers = server.workers.clone();
    revert(workers[0], None);
    assert_eq!(listed_ids(workers[0]), Vec::<u64>::new());
    server.check(0, &[0, 1], "after reverting worker 0");
    assert_eq!(listed_ids(workers[1]), [1]);
    revert(workers[1], Some(1));
    server.check(0, &[0, 0], "after reverting worker 1");
    for &w in &workers {
        assert_eq!(listed_ids(w), Vec::<u64>::new());
        check_reverted(&[code_bytes(w, f), code_bytes(w, g)].concat(), &original)
            .unwrap_or_else(|e| panic!("worker {w}: {e}"));
    }

    // A worker re-applies (its dormant route, inherited): only it changes.
    let applied = apply(workers[1], &patch_b, &[]);
    let id = applied["patch"]["id"].as_u64().expect("patch id");
    assert_eq!(listed_ids(workers[1]), [id]);
    server.check(0, &[0, 2], "after re-applying in worker 1");
    assert_eq!(listed_ids(master), Vec::<u64>::new());
    assert_eq!(listed_ids(workers[0]), Vec::<u64>::new());
    revert(workers[1], None);
    server.check(0, &[0, 0], "at the end");
}

/// A process family that still shares a record an older hotpatch mapped
/// shared: the first change in one process moves its record to a private
/// copy (and unmaps the shared one); the others keep theirs, unchanged.
#[test]
fn a_shared_record_from_an_older_hotpatch_becomes_private() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let exe = build_target(d, "gcc", "forking", FORKING_C, &[]);
    let patch_a = build_patch(d, "patch_a", PATCH_A_C);
    let patch_b = build_patch(d, "patch_b", PATCH_B_C);
    let mut server = Forking::start(&exe, 2, &["legacy"]);
    let master = server.pid();
    let workers = server.workers.clone();
    for &p in workers.iter().chain([&master]) {
        assert_eq!(
            state_mapping(p).map(|(_, private)| private),
            Some(false),
            "process {p}"
        );
        assert_eq!(
            listed_ids(p),
            Vec::<u64>::new(),
            "process {p}: the empty shared record"
        );
    }
    apply(master, &patch_a, &[]);
    assert_eq!(state_mapping(master).map(|(_, private)| private), Some(true));
    assert_eq!(
        maps(master).matches("/memfd:hotpatch-state").count(),
        1,
        "the shared record is still mapped in the master:\n{}",
        maps(master)
    );
    assert_eq!(listed_ids(master), [1]);
    for &w in &workers {
        assert_eq!(
            listed_ids(w),
            Vec::<u64>::new(),
            "worker {w} sees the master's patch"
        );
    }
    server.check(1, &[0, 0], "after apply on the master");
    apply(workers[0], &patch_b, &[]);
    server.check(1, &[2, 0], "after apply on worker 0");
    assert_eq!(listed_ids(workers[1]), Vec::<u64>::new());
    revert(workers[0], None);
    revert(master, None);
    server.check(0, &[0, 0], "at the end");
}

/// A replacement of a shared record cut short (the private region mapped,
/// never written: all zeros): the shared record still holds the truth;
/// the next change writes it into the private region and unmaps the
/// shared one.
#[test]
fn a_replacement_cut_short_keeps_the_shared_record() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let exe = build_target(d, "gcc", "forking", FORKING_C, &[]);
    let patch_a = build_patch(d, "patch_a", PATCH_A_C);
    let mut server = Forking::start(&exe, 1, &[]);
    let master = server.pid();
    apply(master, &patch_a, &[]);
    let (private, _) = state_mapping(master).expect("a private record");
    // The record as an older hotpatch kept it: in a shared mapping.
    server.master.send("share");
    let l = server.master.line("shared", |l| l.starts_with("shared "));
    let shared = u64::from_str_radix(l.trim_start_matches("shared 0x"), 16).expect("address");
    assert_ne!(shared, 0, "the server could not map a shared record");
    let active = u64::from(read_mem(master, private + 12, 1)[0] & 1);
    let half = ((16u64 << 20) - 16) / 2;
    let body_at = 16 + active * half;
    let len = u32::from_le_bytes(
        read_mem(master, private + body_at + 8, 4)
            .try_into()
            .expect("4 bytes"),
    );
    let body = read_mem(master, private + body_at, 12 + len as usize);
    write_mem(master, shared + body_at, &body);
    write_mem(master, shared, &read_mem(master, private, 16));
    // The private one as a tool killed right after mapping it leaves it.
    write_mem(master, private, &[0; 16]);

    assert_eq!(listed_ids(master), [1], "the shared record is the truth");
    revert(master, None);
    server.check(0, &[0], "after reverting the master");
    assert_eq!(listed_ids(master), Vec::<u64>::new());
    assert_eq!(
        maps(master).matches("/memfd:hotpatch-state").count(),
        1,
        "the shared record is still mapped:\n{}",
        maps(master)
    );
    assert_eq!(state_mapping(master), Some((private, true)));
}

/// Patch A of `f` alone, and of `g` alone.
const PATCH_F_C: &str =
    "#include \"hotpatch.h\"\nlong f_a(long x) { return x * 5 + 2; }\nHOTPATCH_REPLACE(f, f_a);\n";
const PATCH_G_C: &str =
    "#include \"hotpatch.h\"\nlong g_a(long x) { return x ^ 0x1234; }\nHOTPATCH_REPLACE(g, g_a);\n";

/// A tool killed right after mapping the state region leaves it all
/// zeros: list, apply and revert treat it as empty and initialise it.
#[test]
fn a_record_never_written_reads_as_empty() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let exe = build_target(d, "gcc", "target", TARGET_C, &[]);
    let patch_f = build_patch(d, "patch_f", PATCH_F_C);
    let patch = build_patch(d, "patch_g", PATCH_G_C);
    let mut target = Target::start(&exe, 2, None, Workers::Duty);
    let pid = target.pid();
    // The region exists (and `f` has a dormant route, which the zeroed
    // record no longer knows: `g` is patched afresh below).
    apply(pid, &patch_f, &[]);
    revert(pid, None);
    let (record, _) = state_mapping(pid).expect("a state record");
    // As a tool killed between the mmap and the first write leaves it (the
    // header is what is read first; both halves zeroed too).
    write_mem(pid, record, &[0; 16]);
    write_mem(pid, record + 16, &[0; 4096]);
    assert_eq!(listed_ids(pid), Vec::<u64>::new());
    let run = hotpatch(&["revert".to_string(), pid.to_string(), "--all".to_string()]);
    assert_eq!(run.code(), 0, "{run:?}");
    apply(pid, &patch, &[]);
    assert_eq!(target.version(), (0, 1));
    assert_eq!(listed_ids(pid).len(), 1);
    assert_eq!(read_mem(pid, record, 8), b"HOTPATCH", "initialised again");
    revert(pid, None);
    assert_eq!(target.version(), (0, 0));
    assert_eq!(listed_ids(pid), Vec::<u64>::new());
}

/// The lock file of process `pid`, as the tool names it (root's lock
/// directory, the pid and the start time from `/proc/PID/stat`).
fn lock_path(pid: i32) -> std::path::PathBuf {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    let start = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(19))
        .expect("start time");
    std::path::Path::new("/run/hotpatch").join(format!("{pid}-{start}.lock"))
}

/// Files a test plants, removed when it ends (pass or fail).
struct Planted(Vec<std::path::PathBuf>);

impl Drop for Planted {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// `hotpatch ARGS…` with `TMPDIR` set to `tmp`.
fn hotpatch_in_tmp(tmp: &std::path::Path, args: &[String]) -> Run {
    let mut cmd = hotpatch_command(args);
    cmd.env("TMPDIR", tmp);
    run_within(WAIT, &mut cmd)
}

/// The process lock does not depend on the environment: a tool whose
/// `TMPDIR` differs still finds the lock held.
#[test]
fn a_held_lock_excludes_tools_whatever_their_tmpdir() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (mut target, patch) = target_and_patch_a(d, 2);
    let pid = target.pid();
    let path = lock_path(pid);
    let _planted = Planted(vec![path.clone()]);
    std::fs::create_dir_all(path.parent().expect("lock dir")).expect("create the lock directory");
    let held = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .expect("open the lock file");
    held.try_lock().expect("take the lock");
    let code = target.code();
    let args = vec!["apply".to_string(), pid.to_string(), patch.display().to_string()];
    for tmp in [d.to_path_buf(), std::env::temp_dir()] {
        let run = hotpatch_in_tmp(&tmp, &args);
        let msg = run.failure();
        assert!(
            msg.contains("another hotpatch is working on it"),
            "TMPDIR={tmp:?}: {msg}"
        );
        assert!(msg.contains(path.to_str().expect("utf-8")), "{msg}");
    }
    assert_eq!(target.code(), code, "nothing changed");
    assert_eq!(target.version(), (0, 0));
    drop(held);
    let run = hotpatch_in_tmp(d, &args);
    assert_eq!(run.code(), 0, "{run:?}");
    assert_eq!(target.version(), (1, 1));
    revert(pid, None);
}

/// A symbolic link or a fifo planted where a lock file goes (in the lock
/// directory, or where older versions put it under `TMPDIR`) is never
/// followed and never blocks the tool; nothing is created or changed.
#[test]
fn planted_links_and_fifos_are_not_followed() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (mut target, patch) = target_and_patch_a(d, 2);
    let pid = target.pid();
    let path = lock_path(pid);
    let start = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".lock"))
        .and_then(|n| n.split_once('-'))
        .map(|(_, s)| s.to_string())
        .expect("start time in the name");
    let old_path = d.join(format!("hotpatch-{pid}-{start}.lock"));
    let _planted = Planted(vec![path.clone(), old_path.clone()]);
    std::fs::create_dir_all(path.parent().expect("lock dir")).expect("create the lock directory");
    let victim = d.join("victim");
    let code = target.code();
    let args = vec!["apply".to_string(), pid.to_string(), patch.display().to_string()];

    for p in [&path, &old_path] {
        std::os::unix::fs::symlink(&victim, p).expect("plant a symbolic link");
    }
    let run = hotpatch_in_tmp(d, &args);
    let msg = run.failure();
    assert!(msg.contains("symbolic link"), "{msg}");
    assert!(
        !victim.exists(),
        "the link was followed: {} created",
        victim.display()
    );

    for p in [&path, &old_path] {
        std::fs::remove_file(p).expect("remove the link");
        let out = Command::new("mkfifo").arg(p).output().expect("run mkfifo");
        assert!(out.status.success(), "mkfifo: {out:?}");
    }
    let run = hotpatch_in_tmp(d, &args);
    let msg = run.failure();
    assert!(msg.contains("not a regular file"), "{msg}");
    assert_eq!(target.code(), code, "nothing changed");
    assert_eq!(target.version(), (0, 0));

    for p in [&path, &old_path] {
        std::fs::remove_file(p).expect("remove the fifo");
    }
    apply(pid, &patch, &[]);
    assert_eq!(target.version(), (1, 1));
    revert(pid, None);
}

/// The entry of function `name` in `list --json`.
/// [`TARGET_C`] started with `workers` duty-cycle workers, and patch A,
/// both built in `d`.
fn target_and_patch_a(d: &std::path::Path, workers: usize) -> (Target, std::path::PathBuf) {
    let exe = build_target(d, "gcc", "target", TARGET_C, &[]);
    let patch = build_patch(d, "patch_a", PATCH_A_C);
    (Target::start(&exe, workers, None, Workers::Duty), patch)
}

fn entry_of(listing: &serde_json::Value, name: &str) -> serde_json::Value {
    listing["entries"]
        .as_array()
        .expect("entries[]")
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no entry of {name} in {listing}"))
        .clone()
}

/// Replace the record of `pid` (its active half, in place) with `record`,
/// as the process itself could.
fn forge_record(pid: i32, record: &serde_json::Value) {
    let (start, _) = state_mapping(pid).expect("a state record");
    let active = u64::from(read_mem(pid, start + 12, 1)[0] & 1);
    let half = ((16u64 << 20) - 16) / 2;
    let at = start + 16 + active * half;
    let mut body = read_mem(pid, at, 8);
    let mut record = record.clone();
    record.as_object_mut().expect("object").remove("entries");
    let json = serde_json::to_vec(&record).expect("json");
    body.extend_from_slice(&(json.len() as u32).to_le_bytes());
    body.extend_from_slice(&json);
    write_mem(pid, at, &body);
}

/// `hotpatch ARGS…` (strings).
fn tool(args: &[&str]) -> Run {
    hotpatch(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
}

/// An entry changed behind the record's back: `list` shows the drift and
/// the bytes, `revert` refuses naming them and writes nothing; once the
/// bytes are back, it reverts.
#[test]
fn drifted_entries_are_shown_and_never_reverted_over() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // No workers: only the main thread runs f and g, when asked.
    let (mut target, patch) = target_and_patch_a(d, 0);
    let pid = target.pid();
    let ps = pid.to_string();
    apply(pid, &patch, &[]);
    let f = entry_of(&list(pid), "f");
    assert_eq!(f["state"], "patched", "{f}");
    assert_eq!(
        (f["patched"].as_str(), f["original"].as_str()),
        (Some("ebf8"), Some("9090"))
    );
    let at = f["address"].as_u64().expect("address");

    // `eb f8` → `66 f8` → `66 90`, one byte at a time (each state runs).
    write_mem(pid, at, &[0x66]);
    write_mem(pid, at + 1, &[0x90]);
    let listing = list(pid);
    let f = entry_of(&listing, "f");
    assert_eq!(
        (f["state"].as_str(), f["found"].as_str()),
        (Some("drifted"), Some("6690")),
        "{f}"
    );
    assert_eq!(entry_of(&listing, "g")["state"], "patched");
    let text = tool(&["list", &ps]);
    assert_eq!(text.code(), 0, "{text:?}");
    assert!(
        text.stdout.contains("DRIFTED") && text.stdout.contains("6690"),
        "{}",
        text.stdout
    );

    let code = target.code();
    let run = tool(&["revert", &ps, "--all"]);
    let msg = run.failure();
    for want in [
        "`f`",
        &format!("{at:#x}"),
        "6690",
        "ebf8",
        "9090",
        "nothing written",
    ] {
        assert!(msg.contains(want), "{msg:?} does not name {want}");
    }
    assert_eq!(target.code(), code, "revert wrote over drifted code");
    assert_eq!(listed_ids(pid), [1]);
    assert_eq!(target.version(), (0, 1));

    // Back to the patched bytes (`66 f8`, then `eb f8`): revert works.
    write_mem(pid, at + 1, &[0xf8]);
    write_mem(pid, at, &[0xeb]);
    revert(pid, None);
    assert_eq!(target.version(), (0, 0));
    assert_eq!(listed_ids(pid), Vec::<u64>::new());
}

/// The record says patched, the code is original (reverted behind the
/// record's back): `list` says so; `revert` only updates the record.
#[test]
fn code_already_original_is_listed_and_reverted() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (mut target, patch) = target_and_patch_a(d, 0);
    let pid = target.pid();
    apply(pid, &patch, &[]);
    let at = entry_of(&list(pid), "f")["address"].as_u64().expect("address");
    // `eb f8` → `90 f8` → `90 90`.
    write_mem(pid, at, &[0x90]);
    write_mem(pid, at + 1, &[0x90]);
    assert_eq!(target.version(), (0, 1));
    let f = entry_of(&list(pid), "f");
    assert_eq!(
        (f["state"].as_str(), f["recorded_patched"].as_bool()),
        (Some("original"), Some(true))
    );
    let text = tool(&["list", &pid.to_string()]);
    assert!(text.stdout.contains("entry original: "), "{}", text.stdout);
    let reverted = revert(pid, None);
    assert_eq!(
        reverted[0]["restored"].as_array().map(Vec::len),
        Some(2),
        "{reverted}"
    );
    assert_eq!(target.version(), (0, 0));
    assert_eq!(listed_ids(pid), Vec::<u64>::new());
}

/// Functions whose versions name a patch the record no longer lists are
/// still reverted by `revert --all` (never "nothing to revert" over code
/// the record says is patched).
#[test]
fn patches_named_only_by_versions_are_reverted() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (mut target, patch) = target_and_patch_a(d, 0);
    let pid = target.pid();
    apply(pid, &patch, &[]);
    let mut record = list(pid);
    record["patches"] = serde_json::json!([]);
    forge_record(pid, &record);
    let text = tool(&["list", &pid.to_string()]);
    assert!(
        text.stdout.contains("patched by a patch with no record"),
        "{}",
        text.stdout
    );
    let run = tool(&["revert", &pid.to_string(), "--all"]);
    assert_eq!(run.code(), 0, "{run:?}");
    assert!(!run.stdout.contains("nothing to revert"), "{}", run.stdout);
    assert_eq!(target.version(), (0, 0));
    assert!(
        list(pid)["functions"]
            .as_array()
            .expect("functions[]")
            .iter()
            .all(|f| f["versions"] == serde_json::json!([])),
        "versions left"
    );
}

/// A record the process forged (a recorded write whose lengths differ):
/// `list` and `revert` fail with one clear line naming the process and
/// the function, never a panic, and change nothing.
#[test]
fn forged_records_are_refused_cleanly() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (mut target, patch) = target_and_patch_a(d, 0);
    let pid = target.pid();
    let ps = pid.to_string();
    apply(pid, &patch, &[]);
    let good = list(pid);
    let mut forged = good.clone();
    let f = forged["functions"]
        .as_array_mut()
        .expect("functions[]")
        .iter_mut()
        .find(|f| f["name"] == "f")
        .expect("f recorded");
    f["undo"][0]["expected"]
        .as_array_mut()
        .expect("expected[]")
        .push(serde_json::json!(0x90));
    forge_record(pid, &forged);
    let code = target.code();
    for args in [
        vec!["list", &ps],
        vec!["revert", &ps, "--all"],
        vec!["revert", &ps, "1"],
    ] {
        let run = tool(&args);
        let msg = run.failure();
        assert!(
            msg.contains(&format!("process {pid}")) && msg.contains("`f`") && msg.contains("invalid"),
            "{args:?}: {msg}"
        );
    }
    assert_eq!(target.code(), code);
    assert_eq!(target.version(), (1, 1));
    assert_no_thread_stopped(pid);
    forge_record(pid, &good);
    revert(pid, None);
    assert_eq!(target.version(), (0, 0));
}

/// First applies (which map the call region and create the state record)
/// SIGKILLed at random moments, each on a fresh process: the target
/// survives, and the next tool can always list and revert to the original.
#[test]
fn first_applies_killed_at_random_moments_leave_a_usable_record() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let exe = build_target(d, "gcc", "target", TARGET_C, &[]);
    let patch = build_patch(d, "patch_a", PATCH_A_C);
    let mut rng = XorShift::seeded();
    let args = |pid: i32| vec!["apply".to_string(), pid.to_string(), patch.display().to_string()];
    // How long a whole first apply takes here.
    let window = {
        let target = Target::start(&exe, 2, None, Workers::Duty);
        let run = hotpatch(&args(target.pid()));
        assert_eq!(run.code(), 0, "{run:?}");
        run.took.as_micros() as u64
    };
    let mut outcomes = BTreeMap::<&str, usize>::new();
    for round in 0..30 {
        let mut target = Target::start(&exe, 2, None, Workers::Duty);
        let pid = target.pid();
        let original = target.code();
        let delay = rng.below(window * 11 / 10);
        let (mut tool, output) = spawn_piped(&mut hotpatch_command(&args(pid)));
        std::thread::sleep(std::time::Duration::from_micros(delay));
        let _ = tool.kill();
        let status = tool.wait().expect("reap hotpatch");
        let (_, stderr) = output();
        if let Some(code) = status.code() {
            assert_eq!(code, 0, "round {round}: {stderr}");
        }
        assert!(
            target.proc.alive(),
            "round {round} (delay {delay} µs): the target died"
        );
        assert_no_thread_stopped(pid);
        let (fv, gv) = target.version();
        assert!(fv <= 1 && gv <= 1, "round {round}: versions {fv} {gv}");
        let record = match state_mapping(pid) {
            None => "no record",
            Some((at, _)) if read_mem(pid, at, 8) == [0; 8] => "record never written",
            Some(_) => "record",
        };
        *outcomes.entry(record).or_default() += 1;
        let listed = hotpatch(&["list".to_string(), pid.to_string(), "--json".to_string()]);
        assert_eq!(listed.code(), 0, "round {round} ({record}): {listed:?}");
        let reverted = hotpatch(&["revert".to_string(), pid.to_string(), "--all".to_string()]);
        assert_eq!(reverted.code(), 0, "round {round} ({record}): {reverted:?}");
        assert_eq!(target.version(), (0, 0), "round {round} ({record})");
        check_reverted(&target.code(), &original).unwrap_or_else(|e| panic!("round {round} ({record}): {e}"));
        assert_eq!(listed_ids(pid), Vec::<u64>::new());
    }
    eprintln!("outcomes: {outcomes:?}");
}
