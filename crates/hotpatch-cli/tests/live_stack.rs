//! Two patches of the same functions, stacked, reverted in both orders:
//! the newest live patch runs; reverting it steps back to the older patch
//! (not the original); reverting the older patch first leaves the newer
//! one running. `list`, run by a fresh tool process each time, shows the
//! right patches at every step, and its `--json` parses.

#[path = "common/live.rs"]
mod live;

use live::*;
use serde_json::Value;

/// The patch ids `list` shows, and for each function the patch whose
/// version is live, checked against the text output too.
fn listed(pid: i32) -> (Vec<u64>, Vec<(String, u64)>) {
    let doc = list(pid);
    let ids: Vec<u64> = doc["patches"]
        .as_array()
        .expect("patches[]")
        .iter()
        .map(|p| {
            assert_eq!(p["complete"], true, "{p}");
            p["id"].as_u64().expect("id")
        })
        .collect();
    // Functions with no version are dormant (reverted; route kept).
    let mut live: Vec<(String, u64)> = doc["functions"]
        .as_array()
        .expect("functions[]")
        .iter()
        .filter(|f| f["versions"].as_array().is_some_and(|v| !v.is_empty()))
        .map(|f| {
            let versions = f["versions"].as_array().expect("versions[]");
            let top: &Value = versions.last().expect("a version");
            (
                f["name"].as_str().expect("name").to_string(),
                top["patch"].as_u64().expect("patch"),
            )
        })
        .collect();
    live.sort();
    // The text form agrees.
    let text = hotpatch(&["list".to_string(), pid.to_string()]);
    assert_eq!(text.code(), 0, "{text:?}");
    if ids.is_empty() {
        assert!(text.stdout.contains("no patches applied"), "{}", text.stdout);
    }
    for id in &ids {
        assert!(text.stdout.contains(&format!("patch {id}: ")), "{}", text.stdout);
    }
    (ids, live)
}

fn both(id: u64) -> Vec<(String, u64)> {
    vec![("f".to_string(), id), ("g".to_string(), id)]
}

#[test]
fn stacking_and_revert_order() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = build_target(dir.path(), "clang", "target", TARGET_C, &["-fcf-protection=full"]);
    let a = build_patch(dir.path(), "patch_a", PATCH_A_C);
    let b = build_patch(dir.path(), "patch_b", PATCH_B_C);
    let mut target = Target::start(&exe, 4, None, Workers::Duty);
    let pid = target.pid();
    let original = target.code();
    target.expect(-1);
    assert_eq!(listed(pid), (vec![], vec![]));

    // Revert B first: A, then the original.
    let id_a = apply(pid, &a, &[])["patch"]["id"].as_u64().expect("id");
    assert_eq!(target.version(), (1, 1), "A runs");
    let after_a = target.code();
    let applied_b = apply(pid, &b, &[]);
    let id_b = applied_b["patch"]["id"].as_u64().expect("id");
    for f in applied_b["functions"].as_array().expect("functions[]") {
        assert_eq!(f["mode"], "superseded", "{f}");
    }
    assert_eq!(target.version(), (2, 2), "B runs");
    assert_eq!(listed(pid), (vec![id_a, id_b], both(id_b)));
    assert_eq!(target.code(), after_a, "a newer version changes the slot only");

    let r = revert(pid, Some(id_b));
    assert_eq!(r[0]["stepped_back"].as_array().map(Vec::len), Some(2), "{r}");
    assert_eq!(
        target.version(),
        (1, 1),
        "after reverting B, A runs (not the original)"
    );
    assert_eq!(listed(pid), (vec![id_a], both(id_a)));
    let r = revert(pid, Some(id_a));
    assert_eq!(r[0]["restored"].as_array().map(Vec::len), Some(2), "{r}");
    assert_eq!(target.version(), (0, 0), "original");
    assert_eq!(listed(pid), (vec![], vec![]));
    check_reverted(&target.code(), &original).expect("reverted");

    // Revert A first while B is live: B keeps running; then the original.
    let id_a = apply(pid, &a, &[])["patch"]["id"].as_u64().expect("id");
    let id_b = apply(pid, &b, &[])["patch"]["id"].as_u64().expect("id");
    assert_eq!(target.version(), (2, 2));
    let r = revert(pid, Some(id_a));
    assert_eq!(r[0]["stepped_back"].as_array().map(Vec::len), Some(2), "{r}");
    assert_eq!(target.version(), (2, 2), "B keeps running after A is reverted");
    assert_eq!(listed(pid), (vec![id_b], both(id_b)));
    // Every worker runs B, not A, not the original.
    target.expect(2);
    target.expect(-1);
    let r = revert(pid, Some(id_b));
    assert_eq!(r[0]["restored"].as_array().map(Vec::len), Some(2), "{r}");
    assert_eq!(target.version(), (0, 0), "original after reverting B");
    assert_eq!(listed(pid), (vec![], vec![]));
    check_reverted(&target.code(), &original).expect("reverted");

    // A patch id that is not applied: a clear error.
    let run = hotpatch(&["revert".to_string(), pid.to_string(), id_b.to_string()]);
    let msg = run.failure();
    assert!(msg.contains(&format!("no patch {id_b}")), "{msg}");

    target.expect(0);
    let s = target.stats();
    assert_eq!((s.bad, s.late), (0, 0), "{s:?}");
    assert!(s.a > 0 && s.b > 0, "{s:?}");
    assert_no_thread_stopped(pid);
}

/// A reverted function's route is revived by the next apply only if it is
/// still exactly what was written: the entry is about to jump into it.
#[test]
fn a_changed_dormant_route_is_refused() {
    use std::os::unix::fs::FileExt;
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = build_target(dir.path(), "gcc", "target", TARGET_C, &[]);
    let a = build_patch(dir.path(), "patch_a", PATCH_A_C);
    let mut target = Target::start(&exe, 2, None, Workers::Duty);
    let pid = target.pid();
    apply(pid, &a, &[]);
    target.expect(1);
    revert(pid, None);
    target.expect(0);
    // Overwrite f's dormant padding jump with other bytes (int3), as
    // another tool might.
    let state = list(pid);
    let f = state["functions"]
        .as_array()
        .expect("functions[]")
        .iter()
        .find(|f| f["name"] == "f")
        .expect("f is recorded");
    let padding = &f["undo"][2];
    let at = padding["address"].as_u64().expect("address");
    let len = padding["expected"].as_array().expect("expected").len();
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .expect("open /proc/PID/mem");
    mem.write_all_at(&vec![0xcc; len], at).expect("write the padding");
    let before = target.code();
    let run = hotpatch(&["apply".to_string(), pid.to_string(), a.display().to_string()]);
    let line = run.failure();
    assert!(
        line.contains("dormant route") && line.contains("nothing written"),
        "{line}"
    );
    assert_eq!(target.code(), before, "no byte may change");
    target.expect(0);
    assert_eq!(listed_ids(pid), Vec::<u64>::new());

    // Padding back to its original nops (what a tool killed before writing
    // the route leaves): the route is written again and the apply works.
    mem.write_all_at(&vec![0x90; len], at).expect("write the padding");
    apply(pid, &a, &[]);
    target.expect(1);
    revert(pid, None);
    target.expect(0);
}
