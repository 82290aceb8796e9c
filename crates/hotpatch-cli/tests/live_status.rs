//! `hotpatch status`: every patched process on the host, from the records
//! inside them, checked against their code. Two targets, one patched: only
//! that one is listed, with its patch; after the revert, none of them (and
//! with `--all`, the one that keeps its record).

#[path = "common/live.rs"]
mod live;

use live::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The entries of `status --json [--all]` for these pids.
fn status_of(pids: &[i32], all: bool) -> Vec<Value> {
    let mut args = vec!["status".to_string(), "--json".to_string()];
    if all {
        args.push("--all".into());
    }
    let v = hotpatch(&args).json();
    v.as_array()
        .expect("status --json is an array")
        .iter()
        .filter(|p| p["pid"].as_i64().is_some_and(|pid| pids.contains(&(pid as i32))))
        .cloned()
        .collect()
}

#[test]
fn status_lists_the_patched_process_and_its_patch() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = build_target(dir.path(), "gcc", "target", TARGET_C, &[]);
    let patch = build_patch(dir.path(), "patch_a", PATCH_A_C);
    let patched = Target::start(&exe, 2, None, Workers::Duty);
    let other = Target::start(&exe, 2, None, Workers::Duty);
    let pids = [patched.pid(), other.pid()];
    assert!(status_of(&pids, false).is_empty());

    let applied = apply(patched.pid(), &patch, &[]);
    let listed = status_of(&pids, false);
    assert_eq!(listed.len(), 1, "{listed:#?}");
    let entry = &listed[0];
    assert_eq!(entry["pid"], patched.pid());
    assert_eq!(entry["exe"].as_str(), Some(exe.display().to_string().as_str()));
    let patches = entry["patches"].as_array().expect("patches");
    assert_eq!(patches.len(), 1);
    assert_eq!(patches[0]["id"], applied["patch"]["id"]);
    let sha: String = Sha256::digest(std::fs::read(&patch).expect("patch"))
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(patches[0]["sha256"].as_str(), Some(sha.as_str()));
    assert!(
        patches[0]["applied_at"]
            .as_u64()
            .is_some_and(|t| t > 1_700_000_000)
    );
    // Its code agrees with the record: every entry patched.
    let entries = entry["entries"].as_array().expect("entries");
    assert!(!entries.is_empty());
    assert!(entries.iter().all(|e| e["state"] == "patched"), "{entries:#?}");

    let text = hotpatch(&["status"]);
    assert!(
        text.stdout.contains(&format!("process {} (", patched.pid())) && text.stdout.contains("applied "),
        "{}",
        text.stdout
    );

    revert(patched.pid(), None);
    assert!(status_of(&pids, false).is_empty());
    let kept = status_of(&pids, true);
    assert_eq!(kept.len(), 1);
    assert!(kept[0]["patches"].as_array().is_some_and(Vec::is_empty));
    drop(other);
}
