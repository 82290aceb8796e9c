//! A 1 MiB symbol name — in a patch's records or in a target's symbol
//! table — is quoted with its start, its end and its length, never whole:
//! every line the tool prints stays short.

#[path = "common/live.rs"]
mod live;

use live::*;
use std::process::Command;

/// No line of `text` is longer than this.
const LINE_MAX: usize = 4200;
const MIB: usize = 1 << 20;

fn assert_short_lines(what: &str, text: &str) {
    for line in text.lines() {
        assert!(
            line.len() <= LINE_MAX,
            "{what}: a line of {} bytes: {}…",
            line.len(),
            &line[..200]
        );
    }
}

fn long_name(c: char) -> String {
    format!("start_{}_end", c.to_string().repeat(MIB))
}

#[test]
fn a_patch_naming_a_mebibyte_symbol_gets_one_short_line() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let exe = build_target(d, "gcc", "target", TARGET_C, &[]);
    let name = long_name('A');
    let patch = build_patch(
        d,
        "long",
        &format!(
            "#include \"hotpatch.h\"\nlong r(long x) {{ return x; }}\nHOTPATCH_REPLACE_NAMED(\"{name}\", r);\n"
        ),
    );
    let target = Target::start(&exe, 1, None, Workers::Idle);
    let run = hotpatch(&[
        "apply".to_string(),
        target.pid().to_string(),
        patch.display().to_string(),
    ]);
    let msg = run.failure();
    assert!(msg.len() <= LINE_MAX, "{} bytes", msg.len());
    assert!(
        msg.contains("start_AAA") && msg.contains(&format!("AAA_end ({} bytes)", name.len())),
        "{msg:.300}"
    );
}

#[test]
fn a_target_with_a_mebibyte_symbol_is_checked_patched_and_listed_in_short_lines() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let name = long_name('B');
    let source = format!(
        "#include <stdio.h>\n#include <stdlib.h>\n\
         __attribute__((noinline)) long big(long x) __asm__(\"{name}\");\n\
         long big(long x) {{ return x * 3 + 1; }}\n\
         int main(void) {{ char l[64]; puts(\"ready\"); fflush(stdout);\n\
         while (fgets(l, sizeof l, stdin)) {{ printf(\"big %ld\\n\", big(atol(l))); fflush(stdout); }} }}\n"
    );
    let exe = build_target(d, "gcc", "longsym", &source, &[]);
    let check = hotpatch(&[
        "check".to_string(),
        exe.display().to_string(),
        "--functions".to_string(),
    ]);
    assert_eq!(check.code(), 0, "{}", check.stderr);
    assert_short_lines("check --functions", &check.stdout);
    let shown = format!("BBB_end ({} bytes)", name.len());
    assert!(check.stdout.contains(&shown), "check does not show the cut name");

    let patch = build_patch(
        d,
        "fix",
        &format!(
            "#include \"hotpatch.h\"\nlong fix(long x) {{ return x * 5 + 2; }}\nHOTPATCH_REPLACE_NAMED(\"{name}\", fix);\n"
        ),
    );
    let mut proc = Proc::spawn(&mut Command::new(&exe));
    proc.line("ready", |l| l == "ready");
    let pid = proc.pid().to_string();
    let run = hotpatch(&["apply", &pid, &patch.display().to_string()]);
    assert_short_lines("apply", &run.stdout);
    assert_short_lines("apply (stderr)", &run.stderr);
    assert!(!run.stderr.contains("panicked"), "{:.300}", run.stderr);
    eprintln!("apply exited {}: {:.300}", run.code(), run.stderr);
    if run.code() == 0 {
        assert!(run.stdout.contains(&shown), "{:.500}", run.stdout);
        proc.send("10");
        assert_eq!(proc.line("an answer", |l| l.starts_with("big ")), "big 52");
        let list = hotpatch(&["list", &pid]);
        assert_eq!(list.code(), 0, "{:.300}", list.stderr);
        assert_short_lines("list", &list.stdout);
        assert!(list.stdout.contains(&shown), "{:.500}", list.stdout);
        let revert = hotpatch(&["revert", &pid, "--all"]);
        assert_eq!(revert.code(), 0, "{:.300}", revert.stderr);
        assert_short_lines("revert", &revert.stdout);
    } else {
        // Refused (e.g. the record has no room for the name): one short line.
        let msg = run.failure();
        assert!(msg.contains(&shown), "{msg:.300}");
    }
    proc.send("10");
    assert!(
        proc.line("an answer", |l| l.starts_with("big "))
            .starts_with("big ")
    );
}
