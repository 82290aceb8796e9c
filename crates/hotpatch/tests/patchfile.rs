//! Patch descriptions read from real shared libraries built with
//! `include/hotpatch.h`, and target symbols found by name.

use hotpatch::Image;
use hotpatch::image::{ImageFile, LookupError, SymbolKind, find_symbol};
use hotpatch::patchfile::copies;
use hotpatch::patchfile::{CommandLineRecords, PatchError, PatchSpec, RefKind};
use hotpatch_testkit::build::{build_sources, compile, include_arg};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `gcc -O2 -g` with `hotpatch.h` on the include path.
fn cc(dir: &Path, out: &str, sources: &[(&str, &str)], flags: &[&str]) -> PathBuf {
    let include = include_arg();
    let mut all = vec!["-O2", "-g", &include];
    all.extend_from_slice(flags);
    build_sources(dir, "gcc", out, sources, &all)
}

/// A patch's references as (kind, symbol, pointer), sorted.
fn sorted_refs(spec: &PatchSpec) -> Vec<(RefKind, &str, &str)> {
    let mut refs: Vec<_> = spec
        .references
        .iter()
        .map(|r| (r.kind, r.symbol.as_str(), r.pointer.as_str()))
        .collect();
    refs.sort();
    refs
}

const PATCH: &str = r#"
#include "hotpatch.h"
HOTPATCH_TARGET("fee-server", "0123abcd");
HOTPATCH_POINTER(long, requests_served);
HOTPATCH_ORIGINAL(long, compute_fee, (long));
long compute_fee_fixed(long amount) { return amount >= 1000000 ? amount / 100 : orig_compute_fee(amount); }
HOTPATCH_REPLACE(compute_fee, compute_fee_fixed);
void *p_fees;
HOTPATCH_REF_NAMED("server.c:fees_charged", p_fees);
"#;

#[test]
fn reads_a_patch_built_with_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let so = cc(dir.path(), "fix.so", &[("fix.c", PATCH)], &["-shared", "-fPIC"]);
    let spec = PatchSpec::read(&so, &CommandLineRecords::default()).unwrap();
    let target = spec.target.as_ref().unwrap();
    assert_eq!(
        (target.image.as_str(), target.build_id.as_deref()),
        ("fee-server", Some("0123abcd"))
    );
    assert_eq!(spec.replacements.len(), 1);
    assert_eq!(spec.replacements[0].target, "compute_fee");
    assert_eq!(spec.replacements[0].replacement, "compute_fee_fixed");
    // The address agrees with nm's view of the patch.
    let nm = Command::new("nm").arg("-D").arg(&so).output().unwrap();
    let nm = String::from_utf8(nm.stdout).unwrap();
    let addr_of = |name: &str| {
        nm.lines()
            .find(|l| l.ends_with(&format!(" {name}")))
            .and_then(|l| u64::from_str_radix(l.split(' ').next().unwrap(), 16).ok())
            .unwrap()
    };
    assert_eq!(
        spec.replacements[0].replacement_address,
        addr_of("compute_fee_fixed")
    );
    assert_eq!(
        sorted_refs(&spec),
        vec![
            (RefKind::Symbol, "requests_served", "hotpatch_ref_requests_served"),
            (RefKind::Symbol, "server.c:fees_charged", "p_fees"),
            (RefKind::Original, "compute_fee", "orig_compute_fee"),
        ]
    );
    for r in &spec.references {
        assert_eq!(r.pointer_address, addr_of(&r.pointer));
    }
}

#[test]
fn plain_library_with_command_line_records() {
    let dir = tempfile::tempdir().unwrap();
    let so = cc(
        dir.path(),
        "plain.so",
        &[("plain.c", "long fixed(long x) { return x + 1; }\nvoid *ptr;\n")],
        &["-shared", "-fPIC"],
    );
    let none = PatchSpec::read(&so, &CommandLineRecords::default()).unwrap_err();
    assert!(matches!(none, PatchError::NotAPatch { .. }), "{none}");
    assert!(none.to_string().contains("plain.so"));
    let extra = CommandLineRecords {
        replace: vec!["compute=fixed".into()],
        refs: vec!["counter=ptr".into()],
        origs: vec![],
    };
    let spec = PatchSpec::read(&so, &extra).unwrap();
    assert_eq!(spec.replacements[0].replacement, "fixed");
    assert_eq!(spec.references[0].pointer, "ptr");
    assert!(spec.target.is_none());

    for (bad, needle) in [
        (vec!["compute=missing".to_string()], "`missing`"),
        (vec!["compute".to_string()], "TARGET=REPLACEMENT"),
        (vec!["compute=ptr".to_string()], "not an exported function"),
    ] {
        let extra = CommandLineRecords {
            replace: bad,
            ..Default::default()
        };
        let e = PatchSpec::read(&so, &extra).unwrap_err().to_string();
        assert!(e.contains(needle) && e.contains("plain.so"), "{e}");
    }
    let extra = CommandLineRecords {
        replace: vec!["compute=fixed".into()],
        refs: vec!["x=fixed".into()],
        ..Default::default()
    };
    let e = PatchSpec::read(&so, &extra).unwrap_err().to_string();
    assert!(e.contains("not an exported variable"), "{e}");
}

#[test]
fn target_symbols_are_found_and_ambiguity_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bin = cc(
        dir.path(),
        "prog",
        &[
            (
                "a.c",
                "static int counter = 1; int get_a(void) { return counter++; }\nstatic int helper(int x) { return x * 3; } int use_a(int x) { return helper(x); }\n",
            ),
            (
                "b.c",
                "static int counter = 2; int get_b(void) { return counter++; }\nint shared_name = 5;\nint main(void) { return 0; }\n",
            ),
        ],
        &["-fno-inline"],
    );
    let image = Image::open(&bin).unwrap();
    let syms = String::from_utf8(Command::new("nm").arg(&bin).output().unwrap().stdout).unwrap();
    let counters: Vec<u64> = syms
        .lines()
        .filter(|l| l.ends_with(" counter"))
        .map(|l| u64::from_str_radix(l.split(' ').next().unwrap(), 16).unwrap())
        .collect();
    assert_eq!(counters.len(), 2);

    match find_symbol(&image, "counter") {
        Err(LookupError::Ambiguous { candidates, .. }) => {
            assert_eq!(candidates.len(), 2);
            assert!(
                candidates.iter().any(|c| c.starts_with("a.c:counter")),
                "{candidates:?}"
            );
            assert!(
                candidates.iter().any(|c| c.starts_with("b.c:counter")),
                "{candidates:?}"
            );
        }
        other => panic!("expected ambiguity, got {other:?}"),
    }
    let a = find_symbol(&image, "a.c:counter").unwrap();
    let b = find_symbol(&image, "b.c:counter").unwrap();
    assert_ne!(a.address, b.address);
    assert!(counters.contains(&a.address) && counters.contains(&b.address));
    assert_eq!(a.kind, SymbolKind::Variable);
    assert_eq!(
        find_symbol(&image, &format!("{:#x}", b.address)).unwrap().address,
        b.address
    );
    let helper = find_symbol(&image, "helper").unwrap();
    assert_eq!(helper.kind, SymbolKind::Function);
    assert!(!helper.global);
    assert!(matches!(
        find_symbol(&image, "nope"),
        Err(LookupError::NotFound { .. })
    ));
    assert!(matches!(
        find_symbol(&image, "c.c:counter"),
        Err(LookupError::NotFound { .. })
    ));
}

/// A patch written in Rust with the `hotpatch-patch` macros carries the
/// same records as one written in C with the header.
#[test]
fn reads_a_rust_patch_built_with_the_macros() {
    let dir = tempfile::tempdir().unwrap();
    let macros = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hotpatch-patch/src/lib.rs");
    let rustc = |args: &[&str]| compile("rustc", args, dir.path());
    rustc(&[
        "--edition=2024",
        "--crate-type=rlib",
        "--crate-name=hotpatch_patch",
        "-O",
        macros.to_str().unwrap(),
    ]);
    std::fs::write(
        dir.path().join("fix.rs"),
        r#"
use hotpatch_patch::{original, reference, replace, target};
target!("fee-server", "00ff");
#[unsafe(no_mangle)]
pub static mut ORIG: Option<extern "C" fn(i64) -> i64> = None;
#[unsafe(no_mangle)]
pub static mut SERVED: *mut i64 = core::ptr::null_mut();
original!(compute_fee, ORIG);
reference!("server.c:requests_served", SERVED);
#[unsafe(no_mangle)]
pub extern "C" fn compute_fee_fixed(amount: i64) -> i64 { amount / 100 }
replace!(compute_fee, compute_fee_fixed);
"#,
    )
    .unwrap();
    rustc(&[
        "--edition=2024",
        "--crate-type=cdylib",
        "-O",
        "--extern",
        "hotpatch_patch=libhotpatch_patch.rlib",
        "fix.rs",
    ]);
    let spec = PatchSpec::read(&dir.path().join("libfix.so"), &CommandLineRecords::default()).unwrap();
    assert_eq!(spec.target.as_ref().unwrap().build_id.as_deref(), Some("00ff"));
    assert_eq!(spec.replacements[0].target, "compute_fee");
    assert_eq!(spec.replacements[0].replacement, "compute_fee_fixed");
    assert_eq!(
        sorted_refs(&spec),
        vec![
            (RefKind::Symbol, "server.c:requests_served", "SERVED"),
            (RefKind::Original, "compute_fee", "ORIG"),
        ]
    );
    // Its own copy of std's statics is no copy of a Rust target's (this
    // test, built with the same std): nothing to warn about.
    let patch = Image::open(dir.path().join("libfix.so")).unwrap();
    let variables = copies::variables(&patch, &spec);
    let me = std::fs::read_link("/proc/self/exe").unwrap();
    let target = ImageFile::open(&me, &me).unwrap();
    let names: Vec<&str> = variables.iter().map(|v| v.name.as_str()).collect();
    let hits = target.symbols_named(&names).unwrap();
    assert_eq!(copies::copies(&patch, &variables, &hits), Vec::new());
}

/// Target names are written into the records as spelled, never
/// macro-expanded: a `#define counter something_else` in the patch (from
/// a header the fixed source shares, or gcc's own `linux` = 1) must not
/// rename the target symbol. Patch-side names are what the compiler
/// emits, so `#define fixed fixed_v2` records `fixed_v2`.
const MACRO_NAMES_PATCH: &str = r#"
#define counter something_else
#define compute_fee no_such_function
#define helper not_the_helper
#define fixed fixed_v2
#include "hotpatch.h"
HOTPATCH_POINTER(long, counter);
HOTPATCH_ORIGINAL(long, compute_fee, (long));
HOTPATCH_FUNCTION(long, helper, (long));
void *p_linux;
HOTPATCH_REF(linux, p_linux);
long fixed(long amount) { return HOTPATCH_VAR(counter) + orig_compute_fee(amount) + call_helper(amount); }
HOTPATCH_REPLACE(compute_fee, fixed);
"#;

#[test]
fn target_names_are_not_macro_expanded() {
    let dir = tempfile::tempdir().unwrap();
    let so = cc(
        dir.path(),
        "macros.so",
        &[("macros.c", MACRO_NAMES_PATCH)],
        &["-shared", "-fPIC", "-std=gnu11"],
    );
    let spec = PatchSpec::read(&so, &CommandLineRecords::default()).unwrap();
    assert_eq!(spec.replacements.len(), 1);
    assert_eq!(spec.replacements[0].target, "compute_fee");
    assert_eq!(spec.replacements[0].replacement, "fixed_v2");
    assert_eq!(
        sorted_refs(&spec),
        vec![
            (RefKind::Symbol, "counter", "hotpatch_ref_counter"),
            (RefKind::Symbol, "helper", "call_helper"),
            (RefKind::Symbol, "linux", "p_linux"),
            (RefKind::Original, "compute_fee", "orig_compute_fee"),
        ]
    );
}

/// A patch with `rel64` records (see the module docs of `patchfile`).
const REL64_PATCH: &str = r#"
#include "hotpatch.h"
long site_counter, site_helper;
void *anchor(void) { return 0; }
long *p_counter;
__asm__(".data\n.globl label_site\nlabel_site: .quad 0\n.text");
int work_fixed(int x) { return x + (int)site_counter + (int)site_helper; }
HOTPATCH_REPLACE(work, work_fixed);
HOTPATCH_REL64(counter, site_counter, -8, anchor);
HOTPATCH_REL64(prog.c:helper, site_helper, 0x10, __hotpatch_got);
HOTPATCH_REL64(0x4010, label_site, 0, site_helper);
HOTPATCH__RECORD("ref counter p_counter 8");
"#;

#[test]
fn reads_rel64_records_and_a_ref_addend() {
    let dir = tempfile::tempdir().unwrap();
    let so = cc(
        dir.path(),
        "fix.so",
        &[("fix.c", REL64_PATCH)],
        &["-shared", "-fPIC", "-Wl,--defsym,__hotpatch_got=ADDR(.got.plt)"],
    );
    let spec = PatchSpec::read(&so, &CommandLineRecords::default()).unwrap();
    let nm = String::from_utf8(Command::new("nm").arg("-D").arg(&so).output().unwrap().stdout).unwrap();
    let addr_of = |name: &str| {
        nm.lines()
            .find(|l| l.ends_with(&format!(" {name}")))
            .and_then(|l| u64::from_str_radix(l.split(' ').next().unwrap(), 16).ok())
            .unwrap()
    };
    // (In any order: gcc emits the records backwards.)
    let mut rel: Vec<_> = spec
        .rel64
        .iter()
        .map(|r| {
            (
                r.site.as_str(),
                r.symbol.as_str(),
                r.site_address,
                r.addend,
                r.base.as_str(),
            )
        })
        .collect();
    rel.sort();
    assert_eq!(
        rel,
        vec![
            ("label_site", "0x4010", addr_of("label_site"), 0, "site_helper"),
            ("site_counter", "counter", addr_of("site_counter"), -8, "anchor"),
            (
                "site_helper",
                "prog.c:helper",
                addr_of("site_helper"),
                16,
                "__hotpatch_got"
            ),
        ]
    );
    assert_eq!(spec.references.len(), 1);
    assert_eq!(
        (spec.references[0].pointer.as_str(), spec.references[0].addend),
        ("p_counter", 8)
    );
}

#[test]
fn bad_rel64_records_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let common = "#include \"hotpatch.h\"\nlong site_a, site_b; int small; static long hidden_site; long *hidden_use(void) { return &hidden_site; }\nvoid *anchor(void) { return 0; }\nint work_fixed(int x) { return x; }\nHOTPATCH_REPLACE(work, work_fixed);\n__thread long tls_base;\n";
    for (i, (records, flags, needles)) in [
        (
            "HOTPATCH_REL64(counter, hidden_site, 0, anchor);",
            "",
            vec!["site `hidden_site`", "not an exported symbol"],
        ),
        (
            "HOTPATCH_REL64(counter, anchor, 0, anchor);",
            "",
            vec!["site `anchor`", "STT_OBJECT or STT_NOTYPE", "STT_FUNC"],
        ),
        (
            "HOTPATCH_REL64(counter, small, 0, anchor);",
            "",
            vec!["site `small`", "4 bytes"],
        ),
        (
            "HOTPATCH_REL64(counter, site_a, 0, nope);",
            "",
            vec!["base `nope`", "not an exported symbol"],
        ),
        (
            "HOTPATCH_REL64(counter, site_a, 0, tls_base);",
            "",
            vec!["base `tls_base`", "STT_TLS"],
        ),
        (
            "HOTPATCH_REL64(counter, site_a, 0, __hotpatch_got);",
            "-Wl,--defsym,__hotpatch_got=_GLOBAL_OFFSET_TABLE_",
            vec!["base `__hotpatch_got`", "not an exported symbol"],
        ),
        (
            "HOTPATCH_REL64(counter, site_a, 0, anchor); HOTPATCH__RECORD(\"ref helper site_a\");",
            "",
            vec![
                "`site_a` (`ref helper`)",
                "`site_a` (`rel64 counter`)",
                "fill the same bytes",
            ],
        ),
        (
            "HOTPATCH_REL64(counter, site_b, 0, anchor); HOTPATCH_REL64(helper, site_b, 8, anchor);",
            "",
            vec![
                "`site_b` (`rel64 counter`)",
                "`site_b` (`rel64 helper`)",
                "fill the same bytes",
            ],
        ),
        (
            "HOTPATCH__RECORD(\"rel64 counter site_a 0x anchor\");",
            "",
            vec!["not a number"],
        ),
        (
            "HOTPATCH__RECORD(\"rel64 counter site_a 0\");",
            "",
            vec!["wrong number of fields"],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("bad{i}.so");
        let source = format!("{common}{records}\n");
        let mut all = vec!["-shared", "-fPIC"];
        if !flags.is_empty() {
            all.push(flags);
        }
        let so = cc(dir.path(), &name, &[(&format!("bad{i}.c"), &source)], &all);
        let e = PatchSpec::read(&so, &CommandLineRecords::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains(&name), "{records}: {e}");
        for needle in needles {
            assert!(e.contains(needle), "{records}: `{needle}` not in: {e}");
        }
    }
}
