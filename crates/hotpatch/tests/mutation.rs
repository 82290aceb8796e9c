//! A mutated ELF never panics the parser, the survey, `prepare`, or the
//! reading of a patch's records: random byte overwrites (biased to the ELF
//! and program headers, the section headers, the symbol tables, the
//! padded-site list and a patch's `.hotpatch` section and signature note),
//! truncations, and both. Errors are fine; panics are not.
//!
//! CI runs `HOTPATCH_FUZZ_CASES` cases per property (default 500); a
//! longer run: `HOTPATCH_FUZZ_CASES=200000 cargo test --release -p hotpatch
//! --test mutation`.

use hotpatch::patchfile::{CommandLineRecords, PatchFile, PatchSpec};
use hotpatch::policy::Keyring;
use hotpatch::policy::key::PrivateKey;
use hotpatch::policy::signature;
use hotpatch_testkit::build::{build_sources, include_arg};
use proptest::prelude::*;
use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

const FIXTURE_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
__attribute__((noinline, cold)) void report(int v) { fprintf(stderr, "bad %d\n", v); }
__attribute__((noinline)) int tiny(void) { return 0; }
__attribute__((noinline)) static int twice(int x) { return x * 2 + (x >> 3); }
__attribute__((noinline)) int checked(int a, int b) {
    if (__builtin_expect(b == 0, 0)) { report(a); report(b); abort(); }
    return a / b;
}
__attribute__((noinline)) const char *pick(int c) {
    switch (c) { case 0: return "a"; case 1: return "b"; case 2: return "c"; case 3: return "d"; default: return "e"; }
}
int main(int argc, char **argv) {
    (void)argv;
    printf("%d %s %d\n", checked(100, argc) + twice(argc), pick(argc), tiny());
    return 0;
}
"#;

/// The pristine fixture and the byte ranges worth aiming at.
struct Fixture {
    bytes: Vec<u8>,
    targets: Vec<Range<usize>>,
}

fn le(bytes: &[u8], at: usize, len: usize) -> u64 {
    let mut v = [0u8; 8];
    v[..len].copy_from_slice(&bytes[at..at + len]);
    u64::from_le_bytes(v)
}

/// Compile `source` with `gcc args… -o OUT` (`hotpatch.h` on the include
/// path) and read the output.
fn compile(source: &str, args: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let include = include_arg();
    let mut flags = args.to_vec();
    flags.push(&include);
    let out = build_sources(dir.path(), "gcc", "f", &[("f.c", source)], &flags);
    std::fs::read(&out).unwrap()
}

/// The ranges worth aiming at in `bytes`: the first 4 KiB (ELF and program
/// headers), the section header table, and every section `interesting`
/// picks by (type, flags).
fn targets(bytes: &[u8], interesting: impl Fn(u64, u64) -> bool) -> Vec<Range<usize>> {
    let shoff = le(bytes, 0x28, 8) as usize;
    let shentsize = le(bytes, 0x3a, 2) as usize;
    let shnum = le(bytes, 0x3c, 2) as usize;
    assert_eq!(shentsize, 64);
    let mut targets = vec![0..4096.min(bytes.len()), shoff..shoff + shnum * 64];
    for i in 0..shnum {
        let h = shoff + i * 64;
        let sh_type = le(bytes, h + 4, 4);
        let offset = le(bytes, h + 24, 8) as usize;
        let size = le(bytes, h + 32, 8) as usize;
        let flags = le(bytes, h + 8, 8);
        if interesting(sh_type, flags) && size > 0 && offset + size <= bytes.len() {
            targets.push(offset..offset + size);
        }
    }
    targets
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let bytes = compile(
            FIXTURE_C,
            &["-O2", "-fpatchable-function-entry=8,6", "-fcf-protection"],
        );
        // Sanity: the pristine file parses and has what we mutate.
        let image = hotpatch::Image::parse("fixture", bytes.clone()).unwrap();
        let report = hotpatch::survey(&image);
        assert!(report.summary.prepared >= 5, "{:?}", report.summary);
        // SYMTAB, STRTAB, RELA, DYNAMIC, DYNSYM, and the padded-site list
        // (PROGBITS with SHF_LINK_ORDER, 8-byte entries).
        let targets = targets(&bytes, |sh_type, flags| {
            matches!(sh_type, 2 | 3 | 4 | 6 | 11) || (sh_type == 1 && flags & 0x80 != 0)
        });
        Fixture { bytes, targets }
    })
}

/// A patch library using every record kind of `include/hotpatch.h`.
const PATCH_C: &str = r#"
#include "hotpatch.h"
HOTPATCH_TARGET("fixture", "0123456789abcdef0123456789abcdef01234567");
HOTPATCH_POINTER(long, counter);
HOTPATCH_ORIGINAL(int, checked, (int, int));
int checked_fixed(int a, int b) { return b == 0 ? 0 : orig_checked(a, b) + (int)HOTPATCH_VAR(counter); }
HOTPATCH_REPLACE(checked, checked_fixed);
"#;

fn patch_fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let unsigned = compile(PATCH_C, &["-O2", "-shared", "-fPIC"]);
        // Signed, so that mutations also reach the signature note's reader.
        let key = PrivateKey::from_seed("fuzz", [9; 32]).unwrap();
        let bytes = signature::sign(&unsigned, &key.key).unwrap();
        assert!(signature::verify(&bytes).unwrap().is_some());
        let file = PatchFile::from_bytes(Path::new("patch.so"), bytes.clone());
        let spec = PatchSpec::from_file(&file, &CommandLineRecords::default()).unwrap();
        assert_eq!(
            (spec.replacements.len(), spec.references.len()),
            (1, 2),
            "{spec:?}"
        );
        // Every section: the .hotpatch records, the dynamic symbols, …
        let targets = targets(&bytes, |_, _| true);
        Fixture { bytes, targets }
    })
}

/// A mutation: where (a target range, or anywhere) and what.
#[derive(Debug, Clone)]
enum Edit {
    /// Overwrite at `pick` within target range `range` (index mod count).
    Targeted {
        range: usize,
        pick: usize,
        value: Vec<u8>,
    },
    /// Overwrite anywhere in the file.
    Anywhere { pick: usize, value: Vec<u8> },
}

fn edit() -> impl Strategy<Value = Edit> {
    // Values: random bytes, or the extremes that break arithmetic.
    let value = prop_oneof![
        prop::collection::vec(any::<u8>(), 1..9),
        Just(vec![0xff; 8]),
        Just(vec![0; 8]),
        Just(vec![0xf0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
        Just(vec![0x40]),
    ];
    prop_oneof![
        4 => (any::<usize>(), any::<usize>(), value.clone())
            .prop_map(|(range, pick, value)| Edit::Targeted { range, pick, value }),
        1 => (any::<usize>(), value).prop_map(|(pick, value)| Edit::Anywhere { pick, value }),
    ]
}

fn apply(f: &Fixture, edits: &[Edit], truncate: Option<usize>) -> Vec<u8> {
    let mut bytes = f.bytes.clone();
    for e in edits {
        let (at, value) = match e {
            Edit::Targeted { range, pick, value } => {
                let r = &f.targets[range % f.targets.len()];
                (r.start + pick % r.len().max(1), value)
            }
            Edit::Anywhere { pick, value } => (pick % bytes.len(), value),
        };
        for (i, v) in value.iter().enumerate() {
            if let Some(b) = bytes.get_mut(at + i) {
                *b = *v;
            }
        }
    }
    if let Some(len) = truncate {
        bytes.truncate(len % (f.bytes.len() + 1));
    }
    bytes
}

/// Parse and survey; the result does not matter, only that it returns.
fn parse_and_survey(bytes: Vec<u8>) {
    if let Ok(image) = hotpatch::Image::parse(Path::new("mutant"), bytes) {
        let report = hotpatch::survey(&image);
        // Touch the report the way the CLI does.
        let _ = report.summary.functions;
        let _ = hotpatch::prepare::prepare(&image);
    }
}

/// Read a patch's records; the result does not matter, only that it
/// returns.
fn read_patch(bytes: Vec<u8>) {
    let file = PatchFile::from_bytes(Path::new("mutant.so"), bytes);
    let _ = hotpatch::policy::verdict(&file, &Keyring::default());
    let _ = PatchSpec::from_file(&file, &CommandLineRecords::default());
}

fn cases() -> u32 {
    std::env::var("HOTPATCH_FUZZ_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(500)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn overwrites_never_panic(edits in prop::collection::vec(edit(), 1..8)) {
        parse_and_survey(apply(fixture(), &edits, None));
    }

    #[test]
    fn truncation_never_panics(len in any::<usize>()) {
        parse_and_survey(apply(fixture(), &[], Some(len)));
    }

    #[test]
    fn overwrites_and_truncation_never_panic(
        edits in prop::collection::vec(edit(), 1..6),
        len in any::<usize>(),
    ) {
        parse_and_survey(apply(fixture(), &edits, Some(len)));
    }

    #[test]
    fn mutated_patches_never_panic(
        edits in prop::collection::vec(edit(), 1..8),
        len in prop::option::of(any::<usize>()),
    ) {
        read_patch(apply(patch_fixture(), &edits, len));
    }
}

/// Every single-byte truncation point of the headers region, exhaustively.
#[test]
fn every_short_prefix() {
    let f = fixture();
    for len in 0..=f.bytes.len().min(1024) {
        parse_and_survey(f.bytes[..len].to_vec());
    }
}

/// Values that break address arithmetic, for [`extreme_fields`].
fn extremes(file_len: u64) -> [u64; 9] {
    [
        0,
        1,
        0xfff,
        file_len,
        file_len + 1,
        1 << 63,
        u64::MAX - 0xfff,
        u64::MAX - 7,
        u64::MAX,
    ]
}

fn set(bytes: &mut [u8], at: usize, len: usize, value: u64) {
    bytes[at..at + len].copy_from_slice(&value.to_le_bytes()[..len]);
}

/// Deterministic: every address/size/offset field of every program
/// header, section header and function symbol set to each extreme value,
/// alone and (for program headers) with the file size above the memory
/// size at a high address.
#[test]
fn extreme_fields() {
    let f = fixture();
    let b = &f.bytes;
    let len = b.len() as u64;
    let mut cases: Vec<Vec<u8>> = Vec::new();
    let mut field = |at: usize, width: usize| {
        for v in extremes(len) {
            let mut m = b.clone();
            set(&mut m, at, width, v);
            cases.push(m);
        }
    };
    // ELF header: e_phoff, e_shoff, e_phnum, e_shnum, e_shstrndx, entsizes.
    for (at, width) in [
        (0x20, 8),
        (0x28, 8),
        (0x36, 2),
        (0x38, 2),
        (0x3a, 2),
        (0x3c, 2),
        (0x3e, 2),
    ] {
        field(at, width);
    }
    let phoff = le(b, 0x20, 8) as usize;
    let phnum = le(b, 0x38, 2) as usize;
    for i in 0..phnum {
        let h = phoff + i * 56;
        for at in [8, 16, 32, 40] {
            field(h + at, 8);
        }
    }
    let shoff = le(b, 0x28, 8) as usize;
    let shnum = le(b, 0x3c, 2) as usize;
    let mut symtabs = Vec::new();
    for i in 0..shnum {
        let h = shoff + i * 64;
        for (at, width) in [(16, 8), (24, 8), (32, 8), (40, 4), (56, 8)] {
            field(h + at, width);
        }
        if matches!(le(b, h + 4, 4), 2 | 11) {
            symtabs.push((le(b, h + 24, 8) as usize, le(b, h + 32, 8) as usize));
        }
    }
    for &(offset, size) in &symtabs {
        for sym in (offset..offset + size).step_by(24) {
            if b[sym + 4] & 0xf == 2 {
                // STT_FUNC: st_value, st_size, st_shndx.
                field(sym + 8, 8);
                field(sym + 16, 8);
                field(sym + 6, 2);
            }
        }
    }
    // A segment at the top of the address space whose file size exceeds
    // its memory size, alone and with the function symbols moved into it.
    let funcs: Vec<usize> = symtabs
        .iter()
        .flat_map(|&(offset, size)| (offset..offset + size).step_by(24))
        .filter(|&sym| b[sym + 4] & 0xf == 2 && le(b, sym + 8, 8) != 0)
        .collect();
    for i in 0..phnum {
        let h = phoff + i * 56;
        if le(b, h, 4) != 1 {
            continue;
        }
        for vaddr in [u64::MAX - 0xfff, u64::MAX - 0x10, 1 << 63] {
            let mut m = b.clone();
            set(&mut m, h + 16, 8, vaddr);
            set(&mut m, h + 40, 8, 8);
            cases.push(m.clone());
            for (k, &sym) in funcs.iter().enumerate() {
                set(&mut m, sym + 8, 8, vaddr + (k as u64 % 8));
            }
            cases.push(m.clone());
            // The same with a consistent segment (file size = memory size).
            set(&mut m, h + 32, 8, 8);
            cases.push(m);
        }
    }
    assert!(cases.len() > 1000, "{} cases", cases.len());
    for case in cases {
        parse_and_survey(case);
    }
}
