//! Direct callers and branches into a function's first bytes that no
//! symbol covers (stripped code) are found: `check --functions` counts
//! them, `apply` asks for `--allow-direct-calls`, and a detour over bytes
//! a branch lands in is refused.

#[path = "common/live.rs"]
mod live;

use live::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

const SOURCE: &str = include_str!("live/stripped_callers.c");

/// Build the target (no padding, `hot` and `target2` exported), and a
/// stripped copy. Returns (unstripped, stripped).
fn build(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let exe = build_unprepared(dir, "gcc", "callers", SOURCE, &["-rdynamic"]);
    let stripped = dir.join("callers.stripped");
    let out = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(&exe)
        .output()
        .expect("run strip");
    assert!(
        out.status.success(),
        "strip: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (exe, stripped)
}

/// Direct calls and jumps to `name` in `objdump -d` of the unstripped
/// build (which still names the static callers), and jumps to `name+N`.
fn objdump_branches(exe: &Path, name: &str) -> (usize, usize) {
    let out = Command::new("objdump")
        .arg("-d")
        .arg(exe)
        .output()
        .expect("objdump -d");
    let text = String::from_utf8_lossy(&out.stdout);
    let branch = |l: &&str| l.contains("\tcall ") || l.contains("\tjmp ") || l.contains("\tj");
    let to_entry = text
        .lines()
        .filter(branch)
        .filter(|l| l.ends_with(&format!("<{name}>")))
        .count();
    let into = text
        .lines()
        .filter(branch)
        .filter(|l| l.contains(&format!("<{name}+0x")))
        .count();
    (to_entry, into)
}

fn function<'a>(image: &'a Value, name: &str) -> &'a Value {
    image["functions"]
        .as_array()
        .expect("functions[]")
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {image}"))
}

fn check_functions(path: &Path) -> Value {
    let run = hotpatch(&[
        "check".to_string(),
        path.display().to_string(),
        "--functions".to_string(),
        "--json".to_string(),
    ]);
    run.json()["images"][0].clone()
}

#[test]
fn check_counts_callers_and_branches_in_stripped_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (exe, stripped) = build(dir.path());
    let (calls, into) = objdump_branches(&exe, "hot");
    assert!(
        calls >= 3,
        "the fixture has at least 3 direct callers of hot: {calls}"
    );
    assert_eq!(into, 0);
    let (_, into_target2) = objdump_branches(&exe, "target2");
    assert_eq!(into_target2, 1, "the fixture jumps to target2+1 once");

    let image = check_functions(&stripped);
    let hot = function(&image, "hot");
    assert_eq!(hot["class"], "detourable", "{hot}");
    assert_eq!(hot["direct_calls"].as_u64(), Some(calls as u64), "{hot}");
    let target2 = function(&image, "target2");
    assert_eq!(target2["class"], "not-patchable", "{target2}");
    assert_eq!(target2["reason"], "branch-into-entry", "{target2}");

    // The people's table says so too.
    let run = hotpatch(&[
        "check".to_string(),
        stripped.display().to_string(),
        "--functions".to_string(),
    ]);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    let line = run
        .stdout
        .lines()
        .find(|l| l.ends_with(" hot"))
        .unwrap_or_else(|| panic!("no line for hot: {}", run.stdout));
    assert!(line.contains(&format!("{calls} direct calls")), "{line}");
}

#[test]
fn apply_asks_for_the_flag_when_callers_are_stripped() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (_, stripped) = build(d);
    let patch = build_patch(
        d,
        "hot_fix",
        "#include \"hotpatch.h\"\nlong hot_fix(long x) { return x * 5 + 2; }\nHOTPATCH_REPLACE(hot, hot_fix);\n",
    );
    let mut target = Proc::spawn(&mut Command::new(&stripped));
    target.line("ready", |l| l == "ready");
    let pid = target.pid();
    let ask = |target: &mut Proc, x: i64| {
        target.send(&x.to_string());
        target.line("an answer", |l| l.contains(' '))
    };
    // hot(x) = 3x + 1: c1 = 3x+2, c2 = 2(3(x^7)+1), c3 = 3(x+11)+1 - (3(x-5)+1) = 48.
    let before = ask(&mut target, 10);
    assert_eq!(
        before,
        format!("{} 11", (3 * 10 + 2) + 2 * (3 * (10 ^ 7) + 1) + 48)
    );

    let hot_entry = symbol_in_process(pid, &stripped, None, "hot");
    let code = read_mem(pid, hot_entry, 8);
    let run = hotpatch(&["apply".to_string(), pid.to_string(), patch.display().to_string()]);
    let msg = run.failure();
    assert!(
        msg.contains("--allow-direct-calls") && msg.contains("`hot`"),
        "{msg}"
    );
    assert_eq!(
        read_mem(pid, hot_entry, 8),
        code,
        "a refused apply changed the code"
    );
    assert!(!maps_file(pid, &patch));
    assert_eq!(ask(&mut target, 10), before);

    // With the flag it goes in: hot(x) = 5x + 2.
    apply(pid, &patch, &["--allow-direct-calls"]);
    let after = ask(&mut target, 10);
    assert_eq!(
        after,
        format!("{} 11", (5 * 10 + 3) + 2 * (5 * (10 ^ 7) + 2) + 80)
    );
    assert!(target.alive());
}
