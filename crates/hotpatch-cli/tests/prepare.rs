//! `hotpatch prepare IN -o OUT`: exactly one byte per gcc `90 90` entry
//! changes (0x90 → 0x66, checked with `cmp -l`), the copy checks as `66 90`
//! everywhere, keeps its mode, and still runs the same.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

/// `cmp -l A B`: (1-based offset, old byte, new byte) of every difference.
fn cmp_l(a: &Path, b: &Path) -> Vec<(u64, u8, u8)> {
    let out = Command::new("cmp").arg("-l").arg(a).arg(b).output().unwrap();
    // cmp exits 1 when the files differ, 2 on trouble.
    assert!(out.status.code().is_some_and(|c| c < 2), "cmp failed: {out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                u8::from_str_radix(f[1], 8).unwrap(),
                u8::from_str_radix(f[2], 8).unwrap(),
            )
        })
        .collect()
}

fn check_prepare(b: CBuild) {
    let dir = tempfile::tempdir().unwrap();
    let input = b.compile(dir.path());
    std::fs::set_permissions(&input, std::fs::Permissions::from_mode(0o751)).unwrap();
    let output = dir.path().join("prepared");
    let (n, m) = b.entry.unwrap();

    let report: serde_json::Value = serde_json::from_str(&stdout_of(
        hotpatch()
            .arg("prepare")
            .arg(&input)
            .arg("-o")
            .arg(&output)
            .arg("--json"),
    ))
    .unwrap();

    // Independent expectation: one rewrite per site, of the first entry
    // nop at site + M (+4 past an endbr64 objdump shows), 0x90 → 0x66.
    let sites = patchable_sites(&input);
    let disasm = disassembly(&input);
    let loads = loads(&input);
    let mut want: Vec<(u64, u8, u8)> = sites
        .iter()
        .map(|s| {
            let entry = s + m;
            let endbr = disasm.get(&entry).is_some_and(|(_, i)| i.starts_with("endbr64"));
            let nops_at = entry + if endbr { 4 } else { 0 };
            (file_offset(&loads, nops_at) + 1, 0x90, 0x66)
        })
        .collect();
    want.sort();
    let diffs = cmp_l(&input, &output);
    assert_eq!(diffs.len(), sites.len(), "one changed byte per gcc entry");
    assert_eq!(diffs, want);
    assert_eq!(report["rewritten"].as_array().unwrap().len(), sites.len());

    // The copy: every prepared function is `66 90` now.
    let image = check_file(&output, true);
    assert_summary_consistent(&image);
    assert_eq!(num(&image["summary"], "prepared"), sites.len() as u64);
    let mut straddling = 0;
    for f in image["functions"].as_array().unwrap() {
        if f["class"] != "prepared" {
            continue;
        }
        let address = num(f, "address");
        let layout = f["layout"].as_str().unwrap();
        assert!(layout.starts_with(&format!("{n},{m} ")), "{layout}");
        assert!(layout.ends_with(" 66 90"), "{}: {layout}", f["name"]);
        let nops_at = address + if layout.contains("endbr64") { 4 } else { 0 };
        let straddles = nops_at % 64 == 63;
        straddling += usize::from(straddles);
        assert_eq!(f["live_safe"], !straddles, "{}", f["name"]);
    }
    assert_eq!(
        num(&image["summary"], "prepared_live_safe"),
        (sites.len() - straddling) as u64
    );

    // Mode kept, and the program behaves the same.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&output), 0o751);
    let before = run_ok(Command::new(&input).args(["a", "b"]));
    let after = run_ok(Command::new(&output).args(["a", "b"]));
    assert!(String::from_utf8_lossy(&before.stdout).starts_with("total="));
    assert_eq!(before.stdout, after.stdout);
    assert_eq!(before.status.code(), after.status.code());

    // Preparing a prepared copy changes nothing.
    let again = dir.path().join("again");
    run_ok(hotpatch().arg("prepare").arg(&output).arg("-o").arg(&again));
    assert_eq!(cmp_l(&output, &again), []);
}

#[test]
fn prepare_gcc_8_6() {
    check_prepare(CBuild::new(Cc::Gcc, Some((8, 6)), false, true));
}

#[test]
fn prepare_gcc_8_6_cf() {
    check_prepare(CBuild::new(Cc::Gcc, Some((8, 6)), true, true));
}

#[test]
fn prepare_gcc_16_14_cf_nopie() {
    check_prepare(CBuild::new(Cc::Gcc, Some((16, 14)), true, false));
}

/// Byte-aligned: some entries straddle a cache line before and after.
#[test]
fn prepare_gcc_8_6_align1() {
    let mut b = CBuild::new(Cc::Gcc, Some((8, 6)), false, true);
    b.align1 = true;
    check_prepare(b);
}

/// clang already emits `66 90`: the copy is identical.
#[test]
fn prepare_clang_is_identity() {
    let dir = tempfile::tempdir().unwrap();
    let input = CBuild::new(Cc::Clang, Some((8, 6)), true, true).compile(dir.path());
    let output = dir.path().join("prepared");
    run_ok(hotpatch().arg("prepare").arg(&input).arg("-o").arg(&output));
    assert_eq!(cmp_l(&input, &output), []);
}
