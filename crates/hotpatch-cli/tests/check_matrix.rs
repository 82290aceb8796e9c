//! `hotpatch check FILE` over a matrix of fixtures compiled at test time
//! (gcc and clang; no padding, `=8,6`, `=16,14`; with and without
//! `-fcf-protection`; PIE and `-no-pie`), a shared library, stripped
//! binaries and a Rust program. Every expected count comes from binutils.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;

/// The names a gcc/clang build of [`fixture_c`] must classify as detourable
/// when built without padding: every user function of 5 bytes or more.
fn user_functions() -> Vec<String> {
    let mut names: Vec<String> = ["main", "checked_div", "color", "sum_array", "report"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    names.extend((1..=GENERATED).map(|k| format!("h{k}")));
    names
}

/// What `objdump` says is at each prepared entry: whether it is endbr64.
fn has_endbr(disasm: &std::collections::BTreeMap<u64, (String, String)>, entry: u64) -> bool {
    let (bytes, insn) = disasm
        .get(&entry)
        .unwrap_or_else(|| panic!("objdump shows no instruction at {entry:#x}"));
    insn.starts_with("endbr64") && bytes == "f3 0f 1e fa"
}

/// Assertions shared by every padded C/Rust build: sites, prepared set,
/// layouts, live-safety. `named` says whether every site has a symbol.
fn assert_prepared(path: &Path, image: &Value, entry: (u64, u64), nops: &str, named: bool) {
    let (n, m) = entry;
    let sec = section(path, "__patchable_function_entries").expect("padded build has the section");
    let sites = patchable_sites(path);
    assert_eq!(sites.len() as u64, sec.size / 8);
    let unique_sites = unique(sites.iter().copied());
    assert_eq!(unique_sites.len(), sites.len(), "duplicate sites");
    assert_eq!(num(image, "padded_sites"), sec.size / 8, "padded_sites");
    assert_eq!(
        num(&image["summary"], "prepared"),
        sites.len() as u64,
        "every site is a prepared function"
    );

    let fns = image["functions"].as_array().unwrap();
    let prepared: BTreeSet<u64> = fns
        .iter()
        .filter(|f| f["class"] == "prepared")
        .map(|f| num(f, "address"))
        .collect();
    let expected: BTreeSet<u64> = sites.iter().map(|s| s + m).collect();
    assert_eq!(prepared, expected, "prepared entries are the sites + {m}");

    let disasm = disassembly(path);
    let mut straddling = 0;
    for f in fns.iter().filter(|f| f["class"] == "prepared") {
        let address = num(f, "address");
        let endbr = has_endbr(&disasm, address);
        let want = format!("{n},{m}{} {nops}", if endbr { " endbr64" } else { "" });
        assert_eq!(f["layout"], want.as_str(), "layout of {}", f["name"]);
        let nops_at = address + if endbr { 4 } else { 0 };
        let straddles = nops_at % 64 == 63;
        straddling += usize::from(straddles);
        assert_eq!(
            f["live_safe"], !straddles,
            "{} at {address:#x}: live-safe unless its entry nops straddle a cache line",
            f["name"]
        );
        if !named {
            assert_eq!(f["name"], format!("fn@{address:#x}").as_str());
        }
    }
    assert_eq!(
        num(&image["summary"], "prepared_live_safe"),
        (sites.len() - straddling) as u64
    );
}

/// The whole check of one C executable build.
fn check_c(b: CBuild) -> (tempfile::TempDir, std::path::PathBuf, Value) {
    let dir = tempfile::tempdir().unwrap();
    let path = b.compile(dir.path());
    let image = check_file(&path, true);
    assert_summary_consistent(&image);
    let kind = if b.pie { "pie-executable" } else { "executable" };
    assert_eq!(image["kind"], kind, "{}", b.name());

    let expected = expected_functions(&path);
    assert_eq!(
        num(&image["summary"], "functions"),
        expected.len() as u64,
        "{}: functions",
        b.name()
    );
    let listed: BTreeSet<u64> = image["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| num(f, "address"))
        .collect();
    assert_eq!(listed, expected.keys().copied().collect::<BTreeSet<_>>());

    // Names: a function's `symbols` are exactly the readelf names there.
    for (address, syms) in &expected {
        let f = function_at(&image, *address);
        let mut want: Vec<String> = syms
            .iter()
            .map(|s| s.name.split('@').next().unwrap().to_string())
            .collect();
        want.sort();
        want.dedup();
        let mut got: Vec<String> = f["symbols"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        got.sort();
        assert_eq!(got, want, "symbols at {address:#x}");
    }

    let by_name = |name: &str| {
        let (&address, _) = expected
            .iter()
            .find(|(_, syms)| syms.iter().any(|s| s.name == name))
            .unwrap_or_else(|| panic!("{}: readelf has no {name}", b.name()));
        function_at(&image, address).clone()
    };

    match b.entry {
        Some(entry) => {
            assert_prepared(&path, &image, entry, b.cc.entry_nops(), true);
            for name in user_functions() {
                assert_eq!(by_name(&name)["class"], "prepared", "{name}");
            }
            // The layouts follow objdump; that objdump agrees with the flag
            // (crt objects carry endbr64 either way, so look at ours only).
            let endbr = image["functions"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|f| f["layout"].as_str().is_some_and(|l| l.contains("endbr64")))
                .count();
            if b.cf_protection {
                assert!(by_name("main")["layout"].as_str().unwrap().contains("endbr64"));
            } else {
                assert_eq!(endbr, 0, "no endbr64 without -fcf-protection");
            }
        }
        None => {
            assert!(section(&path, "__patchable_function_entries").is_none());
            assert_eq!(num(&image, "padded_sites"), 0);
            assert_eq!(num(&image["summary"], "prepared"), 0);
            for name in user_functions() {
                assert_eq!(
                    by_name(&name)["class"],
                    "detourable",
                    "{name}: {}",
                    by_name(&name)
                );
            }
            // Sizes from readelf decide the two size reasons exactly.
            for (address, syms) in &expected {
                let size = syms.iter().map(|s| s.size).max().unwrap();
                let f = function_at(&image, *address);
                if size == 0 {
                    assert_eq!(f["reason"], "unknown-size", "{f}");
                } else if size < 5 {
                    assert_eq!(f["reason"], "too-small", "{f}");
                }
            }
            let big: Vec<&Value> = expected
                .iter()
                .filter(|(_, syms)| syms.iter().all(|s| !s.name.contains(".cold")))
                .filter(|(_, syms)| syms.iter().map(|s| s.size).max().unwrap() >= 5)
                .map(|(a, _)| function_at(&image, *a))
                .collect();
            let detourable = big.iter().filter(|f| f["class"] == "detourable").count();
            assert!(
                detourable * 10 >= big.len() * 9,
                "only {detourable} of {} functions of 5+ bytes are detourable",
                big.len()
            );
        }
    }

    // Compiler clones, as nm names them.
    let names = nm(&path);
    let mut colds = 0;
    let mut constprops = 0;
    for (address, name) in &names {
        let Some((base, rest)) = name.split_once('.') else {
            continue;
        };
        if !expected.contains_key(address) || base.is_empty() {
            continue;
        }
        let f = function_at(&image, *address);
        if rest.split('.').any(|p| p == "cold") {
            colds += 1;
            assert_eq!(f["class"], "not-patchable", "{name}");
            assert_eq!(f["reason"], "cold-part", "{name}");
            assert_eq!(f["clone_of"], base, "{name}");
        } else if ["constprop", "part", "isra"]
            .iter()
            .any(|k| rest.split('.').any(|p| p == *k))
        {
            constprops += 1;
            assert_eq!(f["clone_of"], base, "{name}");
        }
    }
    if b.cc == Cc::Gcc {
        // gcc -O2 does split and clone this fixture; if it stops, the
        // fixture no longer tests what it is meant to.
        assert_eq!(colds, 1, "gcc made checked_div.cold");
        assert!(constprops >= 1, "gcc made scale.constprop.N");
    }
    (dir, path, image)
}

macro_rules! matrix {
    ($($name:ident: $cc:ident, $entry:expr, $cf:expr, $pie:expr;)*) => {$(
        #[test]
        fn $name() {
            check_c(CBuild::new(Cc::$cc, $entry, $cf, $pie));
        }
    )*};
}

matrix! {
    gcc_nopad_pie: Gcc, None, false, true;
    gcc_nopad_nopie: Gcc, None, false, false;
    gcc_nopad_cf_pie: Gcc, None, true, true;
    gcc_nopad_cf_nopie: Gcc, None, true, false;
    gcc_8_6_pie: Gcc, Some((8, 6)), false, true;
    gcc_8_6_nopie: Gcc, Some((8, 6)), false, false;
    gcc_8_6_cf_pie: Gcc, Some((8, 6)), true, true;
    gcc_8_6_cf_nopie: Gcc, Some((8, 6)), true, false;
    gcc_16_14_pie: Gcc, Some((16, 14)), false, true;
    gcc_16_14_nopie: Gcc, Some((16, 14)), false, false;
    gcc_16_14_cf_pie: Gcc, Some((16, 14)), true, true;
    gcc_16_14_cf_nopie: Gcc, Some((16, 14)), true, false;
    clang_nopad_pie: Clang, None, false, true;
    clang_nopad_nopie: Clang, None, false, false;
    clang_nopad_cf_pie: Clang, None, true, true;
    clang_nopad_cf_nopie: Clang, None, true, false;
    clang_8_6_pie: Clang, Some((8, 6)), false, true;
    clang_8_6_nopie: Clang, Some((8, 6)), false, false;
    clang_8_6_cf_pie: Clang, Some((8, 6)), true, true;
    clang_8_6_cf_nopie: Clang, Some((8, 6)), true, false;
    clang_16_14_pie: Clang, Some((16, 14)), false, true;
    clang_16_14_nopie: Clang, Some((16, 14)), false, false;
    clang_16_14_cf_pie: Clang, Some((16, 14)), true, true;
    clang_16_14_cf_nopie: Clang, Some((16, 14)), true, false;
}

/// Byte-aligned functions: some entries straddle a cache line, and exactly
/// those (computed from readelf addresses) are not live-safe.
#[test]
fn gcc_8_6_align1_straddling_entries_are_not_live_safe() {
    let mut b = CBuild::new(Cc::Gcc, Some((8, 6)), false, true);
    b.align1 = true;
    let (_dir, _path, image) = check_c(b);
    let s = &image["summary"];
    assert!(
        num(s, "prepared_live_safe") < num(s, "prepared"),
        "the fixture should place at least one entry across a cache line"
    );
}

#[test]
fn gcc_8_6_cf_align1() {
    let mut b = CBuild::new(Cc::Gcc, Some((8, 6)), true, true);
    b.align1 = true;
    check_c(b);
}

/// A padded shared library: `.dynsym` and `.symtab` names merged per
/// address, an alias merged into its target.
fn check_shared(cc: Cc) {
    let dir = tempfile::tempdir().unwrap();
    let mut b = CBuild::new(cc, Some((8, 6)), true, true);
    b.shared = true;
    let path = b.compile(dir.path());
    let image = check_file(&path, true);
    assert_summary_consistent(&image);
    assert_eq!(image["kind"], "shared-library");
    let expected = expected_functions(&path);
    assert_eq!(num(&image["summary"], "functions"), expected.len() as u64);
    assert_prepared(&path, &image, (8, 6), cc.entry_nops(), true);

    let syms = symbols(&path);
    let addr = |name: &str| {
        syms.iter()
            .find(|s| s.name == name && s.table == ".dynsym")
            .unwrap_or_else(|| panic!("{name} not exported"))
            .value
    };
    assert_eq!(addr("lib_sub"), addr("lib_sub_alias"));
    let f = function_at(&image, addr("lib_sub"));
    let names: BTreeSet<&str> = f["symbols"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(names, BTreeSet::from(["lib_sub", "lib_sub_alias"]));
    for name in ["lib_add", "lib_sub", "lib_name"] {
        assert_eq!(function_at(&image, addr(name))["class"], "prepared", "{name}");
    }
}

#[test]
fn gcc_shared_library() {
    check_shared(Cc::Gcc);
}

#[test]
fn clang_shared_library() {
    check_shared(Cc::Clang);
}

/// A stripped padded binary: its prepared sites still show, as `fn@0x…`,
/// with the same layouts as the unstripped build.
fn check_stripped(b: CBuild) {
    let dir = tempfile::tempdir().unwrap();
    let path = b.compile(dir.path());
    let stripped = dir.path().join("stripped");
    strip(&path, &stripped);
    assert!(section(&stripped, ".symtab").is_none(), "strip removed .symtab");
    let image = check_file(&stripped, true);
    assert_summary_consistent(&image);
    let (n, m) = b.entry.unwrap();

    let sites = patchable_sites(&stripped);
    let mut expected = unique(expected_functions(&stripped).keys().copied());
    let named = expected.len();
    expected.extend(sites.iter().map(|s| s + m));
    assert_eq!(num(&image["summary"], "functions"), expected.len() as u64);
    assert_eq!(expected.len(), named + sites.len(), "no site is named by .dynsym");
    assert_prepared(&stripped, &image, (n, m), b.cc.entry_nops(), false);

    // Same classes and layouts as with symbols.
    let full = check_file(&path, true);
    for f in image["functions"].as_array().unwrap() {
        let g = function_at(&full, num(f, "address"));
        assert_eq!(f["layout"], g["layout"], "{}", f["name"]);
        assert_eq!(f["live_safe"], g["live_safe"], "{}", f["name"]);
    }
}

#[test]
fn gcc_stripped() {
    check_stripped(CBuild::new(Cc::Gcc, Some((8, 6)), false, true));
}

#[test]
fn clang_stripped_cf_16_14() {
    check_stripped(CBuild::new(Cc::Clang, Some((16, 14)), true, true));
}

#[test]
fn gcc_stripped_cf_nopie() {
    check_stripped(CBuild::new(Cc::Gcc, Some((8, 6)), true, false));
}

/// Rust with `-Zpatchable-function-entry=8,6`: the crate's own functions
/// are prepared (one per site), the precompiled std is not.
#[test]
fn rust_8_6() {
    let dir = tempfile::tempdir().unwrap();
    let path = compile_rust(dir.path());
    let image = check_file(&path, true);
    assert_summary_consistent(&image);
    let expected = expected_functions(&path);
    assert_eq!(num(&image["summary"], "functions"), expected.len() as u64);
    assert_prepared(&path, &image, (8, 6), "66 90", true);

    let fns = image["functions"].as_array().unwrap();
    let named = |name: &str| {
        let hits: Vec<&Value> = fns.iter().filter(|f| f["name"] == name).collect();
        assert_eq!(hits.len(), 1, "one function named {name}");
        hits[0]
    };
    for name in [
        "fixture::add",
        "fixture::mul_add",
        "fixture::describe",
        "fixture::main",
    ] {
        assert_eq!(named(name)["class"], "prepared", "{name}");
    }
    for name in ["std::io::stdio::_print", "std::rt::lang_start_internal"] {
        assert_ne!(named(name)["class"], "prepared", "{name} (precompiled std)");
    }
    // Precompiled std dominates the binary.
    assert!(num(&image["summary"], "prepared") * 10 < expected.len() as u64);
}
