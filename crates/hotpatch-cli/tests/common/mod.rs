//! Shared fixture building and independent oracles for the CLI tests.
//!
//! Fixtures are compiled at test time (gcc, clang, rustc) into a temporary
//! directory owned by the test. Expected values come from binutils
//! (`readelf`, `objdump`, `nm`, `cmp`) and `/proc`, never from the
//! `hotpatch` library itself.

#![allow(dead_code)] // each test binary uses a different part of this module

pub use hotpatch_testkit::proc::{run_ok, stdout_of};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The `hotpatch` binary under test.
pub fn hotpatch() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hotpatch"));
    cmd.env_remove("HOTPATCH_LOG").env_remove("RUST_LOG");
    cmd
}

/// `hotpatch check FILE --json [--functions]`, the first (only) image.
pub fn check_file(path: &Path, functions: bool) -> Value {
    let mut cmd = hotpatch();
    cmd.arg("check").arg(path).arg("--json");
    if functions {
        cmd.arg("--functions");
    }
    let doc: Value = serde_json::from_str(&stdout_of(&mut cmd)).expect("check --json is JSON");
    let images = doc["images"].as_array().expect("images[]");
    assert_eq!(images.len(), 1, "check FILE reports one image");
    images[0].clone()
}

/// `u64` field of a JSON object, panicking with the field name.
pub fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

// ---------------------------------------------------------------- sources

/// How many generated one-line functions the C fixture carries. Built with
/// `-falign-functions=1` they land at every offset of a cache line, so some
/// entries straddle one (the live-safety exception).
pub const GENERATED: usize = 96;

/// The C fixture: global and static functions, noinline helpers, a cold
/// split (`checked_div.cold` with gcc), a constprop clone
/// (`scale.constprop.0` with gcc), a tiny function, a switch, and `main`
/// printing something computed. With argument `wait` it prints `ready` and
/// blocks reading stdin.
pub fn fixture_c() -> String {
    let mut src = String::from(
        r#"#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int counter;

__attribute__((noinline, cold)) void report(const char *what, int value) {
    fprintf(stderr, "fatal: %s %d\n", what, value);
}

__attribute__((noinline)) int tiny(void) { return 0; }

__attribute__((noinline)) static int scale(int x, int factor) {
    int r = 0;
    for (int i = 0; i < factor; i++) r += (x * (i + 1)) ^ (r >> 3);
    return r;
}

__attribute__((noinline)) int checked_div(int a, int b) {
    if (__builtin_expect(b == 0, 0)) {
        report("division by zero", a);
        report("divisor", b);
        abort();
    }
    return a / b;
}

__attribute__((noinline)) const char *color(int c) {
    switch (c) {
    case 0: return "red";
    case 1: return "green";
    case 2: return "blue";
    case 3: return "cyan";
    case 4: return "magenta";
    case 5: return "yellow";
    case 6: return "black";
    default: return "white";
    }
}

static int work(int n) {
    int s = 0;
    for (int i = 0; i < n; i++) {
        s += scale(i, 3) + scale(n - i, 3);
        counter++;
    }
    return s;
}

__attribute__((noinline)) long sum_array(const int *a, int n) {
    long s = 0;
    for (int i = 0; i < n; i++) s += a[i];
    return s;
}

"#,
    );
    for k in 1..=GENERATED {
        writeln!(
            src,
            "__attribute__((noinline)) int h{k}(int x) {{ return x * {} + (x >> {}); }}",
            k * 37,
            k % 7
        )
        .unwrap();
    }
    src.push_str("typedef int (*hfn)(int);\nstatic hfn const table[] = {");
    for k in 1..=GENERATED {
        write!(src, "h{k},").unwrap();
    }
    src.push_str(
        r#"};

int main(int argc, char **argv) {
    int arr[16];
    for (int i = 0; i < 16; i++) arr[i] = i * i + argc;
    long total = work(argc + 9) + checked_div(1000, argc) + tiny() + sum_array(arr, 16);
    for (unsigned i = 0; i < sizeof table / sizeof table[0]; i++) total += table[i](argc + (int)i);
    printf("total=%ld color=%s counter=%d\n", total, color(argc + 1), counter);
    if (argc > 1 && strcmp(argv[1], "wait") == 0) {
        char buf[8];
        printf("ready\n");
        fflush(stdout);
        while (read(0, buf, sizeof buf) > 0) {}
    }
    return 0;
}
"#,
    );
    src
}

/// A small shared library: exported functions, a static helper, an alias.
pub const LIBRARY_C: &str = r#"
__attribute__((noinline)) static int helper(int x) { return x * 3 + (x >> 2); }
__attribute__((noinline)) int lib_add(int a, int b) { return helper(a) + b; }
__attribute__((noinline)) int lib_sub(int a, int b) { return helper(a) - helper(b); }
int lib_sub_alias(int a, int b) __attribute__((alias("lib_sub")));
__attribute__((noinline)) const char *lib_name(int c) {
    switch (c) { case 0: return "a"; case 1: return "b"; case 2: return "c"; case 3: return "d"; default: return "z"; }
}
"#;

/// The Rust fixture: user functions `fixture::add`, `fixture::mul_add`,
/// `fixture::describe`, and `main` printing something computed.
pub const FIXTURE_RS: &str = r#"
use std::hint::black_box;

#[inline(never)]
pub fn add(a: u64, b: u64) -> u64 {
    a.wrapping_add(b)
}

#[inline(never)]
fn mul_add(a: u64, b: u64, c: u64) -> u64 {
    a.wrapping_mul(b).wrapping_add(c)
}

#[inline(never)]
fn describe(n: u64) -> &'static str {
    match n % 5 {
        0 => "zero",
        1 => "one",
        2 => "two",
        3 => "three",
        _ => "many",
    }
}

fn main() {
    let x = add(black_box(40), black_box(2));
    let y = mul_add(black_box(x), 3, 7);
    println!("x={x} y={y} {}", describe(black_box(y)));
}
"#;

// ----------------------------------------------------------------- builds

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cc {
    Gcc,
    Clang,
}

impl Cc {
    pub fn command(self) -> &'static str {
        match self {
            Cc::Gcc => "gcc",
            Cc::Clang => "clang",
        }
    }

    /// The entry nops each compiler emits.
    pub fn entry_nops(self) -> &'static str {
        match self {
            Cc::Gcc => "90 90",
            Cc::Clang => "66 90",
        }
    }
}

/// One C build of the matrix.
#[derive(Debug, Clone, Copy)]
pub struct CBuild {
    pub cc: Cc,
    /// `-fpatchable-function-entry=N,M`.
    pub entry: Option<(u64, u64)>,
    pub cf_protection: bool,
    pub pie: bool,
    /// `-falign-functions=1`: entries at every offset of a cache line.
    pub align1: bool,
    /// `-shared -fPIC` of [`LIBRARY_C`] instead of the executable.
    pub shared: bool,
}

impl CBuild {
    pub fn new(cc: Cc, entry: Option<(u64, u64)>, cf_protection: bool, pie: bool) -> CBuild {
        CBuild {
            cc,
            entry,
            cf_protection,
            pie,
            align1: false,
            shared: false,
        }
    }

    pub fn name(&self) -> String {
        let entry = self
            .entry
            .map(|(n, m)| format!("{n}-{m}"))
            .unwrap_or_else(|| "nopad".into());
        format!(
            "{}-{entry}{}{}{}",
            self.cc.command(),
            if self.cf_protection { "-cf" } else { "" },
            if self.shared {
                "-shared"
            } else if self.pie {
                "-pie"
            } else {
                "-nopie"
            },
            if self.align1 { "-align1" } else { "" },
        )
    }

    /// Compile into `dir`; returns the output path.
    pub fn compile(&self, dir: &Path) -> PathBuf {
        let name = self.name();
        let src = dir.join(format!("{name}.c"));
        std::fs::write(
            &src,
            if self.shared {
                LIBRARY_C.to_string()
            } else {
                fixture_c()
            },
        )
        .unwrap();
        let out = dir.join(if self.shared {
            format!("lib{name}.so")
        } else {
            name
        });
        let mut cmd = Command::new(self.cc.command());
        cmd.arg("-O2");
        if let Some((n, m)) = self.entry {
            cmd.arg(format!("-fpatchable-function-entry={n},{m}"));
        }
        cmd.arg(if self.cf_protection {
            "-fcf-protection=full"
        } else {
            "-fcf-protection=none"
        });
        if self.shared {
            cmd.args(["-shared", "-fPIC"]);
        } else if self.pie {
            cmd.args(["-fPIE", "-pie"]);
        } else {
            cmd.args(["-fno-PIE", "-no-pie"]);
        }
        if self.align1 {
            cmd.arg("-falign-functions=1");
        }
        cmd.arg("-o").arg(&out).arg(&src);
        run_ok(&mut cmd);
        out
    }
}

/// `strip` a copy of `path` to `out`.
pub fn strip(path: &Path, out: &Path) {
    run_ok(Command::new("strip").arg("-o").arg(out).arg(path));
}

/// The Rust fixture, built with `-Zpatchable-function-entry=8,6`.
pub fn compile_rust(dir: &Path) -> PathBuf {
    let src = dir.join("fixture.rs");
    std::fs::write(&src, FIXTURE_RS).unwrap();
    let out = dir.join("fixture-rs");
    run_ok(
        Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
            .env("RUSTC_BOOTSTRAP", "1")
            .args([
                "-O",
                "-Zpatchable-function-entry=8,6",
                "--crate-name",
                "fixture",
                "-o",
            ])
            .arg(&out)
            .arg(&src),
    );
    out
}

// ---------------------------------------------------------------- readelf

/// One symbol line of `readelf -sW`.
#[derive(Debug, Clone)]
pub struct Symbol {
    pub value: u64,
    pub size: u64,
    pub kind: String,
    pub ndx: String,
    pub name: String,
    /// `.symtab` or `.dynsym`.
    pub table: String,
}

/// Every symbol of `.symtab` and `.dynsym` (`readelf -sW` prints both).
pub fn symbols(path: &Path) -> Vec<Symbol> {
    let text = stdout_of(Command::new("readelf").arg("-sW").arg(path));
    let mut table = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Symbol table '") {
            table = rest.split('\'').next().unwrap_or_default().to_string();
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 7 || !fields[0].ends_with(':') || fields[0] == "Num:" {
            continue;
        }
        let size = fields[2];
        let size = match size.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).unwrap(),
            None => size.parse().unwrap(),
        };
        out.push(Symbol {
            value: u64::from_str_radix(fields[1], 16).unwrap(),
            size,
            kind: fields[3].to_string(),
            ndx: fields[6].to_string(),
            name: fields.get(7).copied().unwrap_or_default().to_string(),
            table: table.clone(),
        });
    }
    assert!(
        !out.is_empty() || !text.contains("Symbol table"),
        "no symbols parsed"
    );
    out
}

/// A `PT_LOAD` of `readelf -lW`.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub offset: u64,
    pub vaddr: u64,
    pub filesz: u64,
    pub memsz: u64,
    pub executable: bool,
}

fn hex_u64(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap_or_else(|_| panic!("not hex: {s}"))
}

pub fn loads(path: &Path) -> Vec<Load> {
    let text = stdout_of(Command::new("readelf").arg("-lW").arg(path));
    let loads: Vec<Load> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&"LOAD")).then(|| Load {
                offset: hex_u64(f[1]),
                vaddr: hex_u64(f[2]),
                filesz: hex_u64(f[4]),
                memsz: hex_u64(f[5]),
                // Flags may be split ("R E"); the alignment is last.
                executable: f[6..f.len() - 1].concat().contains('E'),
            })
        })
        .collect();
    assert!(!loads.is_empty(), "no PT_LOAD in {}", path.display());
    loads
}

/// File offset of a virtual address, from the `PT_LOAD`s.
pub fn file_offset(loads: &[Load], address: u64) -> u64 {
    let l = loads
        .iter()
        .find(|l| address >= l.vaddr && address < l.vaddr + l.filesz)
        .unwrap_or_else(|| panic!("{address:#x} is in no PT_LOAD"));
    l.offset + (address - l.vaddr)
}

/// What the README defines as the functions of a file, computed from
/// `readelf`: defined FUNC/IFUNC symbols (both tables, st_value != 0), one
/// per address, in an executable `PT_LOAD`. Address → symbols there.
pub fn expected_functions(path: &Path) -> BTreeMap<u64, Vec<Symbol>> {
    let loads = loads(path);
    let mut out: BTreeMap<u64, Vec<Symbol>> = BTreeMap::new();
    for s in symbols(path) {
        if (s.kind == "FUNC" || s.kind == "IFUNC") && s.ndx != "UND" && s.value != 0 {
            let in_code = loads
                .iter()
                .any(|l| l.executable && s.value >= l.vaddr && s.value < l.vaddr + l.memsz);
            if in_code {
                out.entry(s.value).or_default().push(s);
            }
        }
    }
    out
}

/// A section header of `readelf -SW`.
#[derive(Debug, Clone, Copy)]
pub struct Section {
    pub addr: u64,
    pub offset: u64,
    pub size: u64,
}

pub fn section(path: &Path, name: &str) -> Option<Section> {
    let text = stdout_of(Command::new("readelf").arg("-SW").arg(path));
    text.lines().find_map(|l| {
        // "  [26] __patchable_function_entries PROGBITS  addr off size ..."
        let rest = l.trim_start().strip_prefix('[')?.split_once(']')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        (f.first() == Some(&name)).then(|| Section {
            addr: hex_u64(f[2]),
            offset: hex_u64(f[3]),
            size: hex_u64(f[4]),
        })
    })
}

/// The 8-byte values of `__patchable_function_entries`, from
/// `readelf -x`; slots whose bytes are zero (rust-lld PIE) take the addend
/// of the `R_X86_64_RELATIVE` relocation at that slot (`readelf -rW`).
pub fn patchable_sites(path: &Path) -> Vec<u64> {
    let Some(sec) = section(path, "__patchable_function_entries") else {
        return Vec::new();
    };
    let dump = stdout_of(
        Command::new("readelf")
            .args(["-x", "__patchable_function_entries"])
            .arg(path),
    );
    let mut bytes = Vec::new();
    for line in dump.lines() {
        let Some(rest) = line.trim_start().strip_prefix("0x") else {
            continue;
        };
        // "0x00004048 80130000 00000000 b0100000 00000000 ................"
        for word in rest.split_whitespace().skip(1).take(4) {
            if word.len() % 2 != 0 || !word.bytes().all(|b| b.is_ascii_hexdigit()) {
                break;
            }
            for i in (0..word.len()).step_by(2) {
                bytes.push(u8::from_str_radix(&word[i..i + 2], 16).unwrap());
            }
        }
    }
    assert_eq!(bytes.len() as u64, sec.size, "readelf -x dump length");
    let relocs = relative_relocs(path);
    bytes
        .chunks_exact(8)
        .enumerate()
        .map(|(i, c)| {
            let v = u64::from_le_bytes(c.try_into().unwrap());
            if v != 0 {
                v
            } else {
                *relocs
                    .get(&(sec.addr + 8 * i as u64))
                    .unwrap_or_else(|| panic!("slot {i} is zero and has no relocation"))
            }
        })
        .collect()
}

/// `r_offset → addend` of every `R_X86_64_RELATIVE` (`readelf -rW`).
pub fn relative_relocs(path: &Path) -> BTreeMap<u64, u64> {
    let text = stdout_of(Command::new("readelf").arg("-rW").arg(path));
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 4 && f[2] == "R_X86_64_RELATIVE").then(|| (hex_u64(f[0]), hex_u64(f[3])))
        })
        .collect()
}

/// `objdump -d`: the instruction starting at each address, as
/// (raw bytes "f3 0f 1e fa", mnemonic text).
pub fn disassembly(path: &Path) -> BTreeMap<u64, (String, String)> {
    let text = stdout_of(Command::new("objdump").args(["-d", "-w"]).arg(path));
    text.lines()
        .filter_map(|l| {
            let mut parts = l.split('\t');
            let addr = parts.next()?.trim().strip_suffix(':')?;
            let addr = u64::from_str_radix(addr, 16).ok()?;
            let bytes = parts.next()?.trim().to_string();
            let insn = parts.next().unwrap_or_default().trim().to_string();
            Some((addr, (bytes, insn)))
        })
        .collect()
}

/// `nm` names with their addresses.
pub fn nm(path: &Path) -> Vec<(u64, String)> {
    let text = stdout_of(Command::new("nm").arg(path));
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3).then(|| (hex_u64(f[0]), f[2].to_string()))
        })
        .collect()
}

/// Unique values, sorted.
pub fn unique(values: impl IntoIterator<Item = u64>) -> BTreeSet<u64> {
    values.into_iter().collect()
}

/// The JSON function at `address`.
pub fn function_at(image: &Value, address: u64) -> &Value {
    image["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["address"].as_u64() == Some(address))
        .unwrap_or_else(|| panic!("no function at {address:#x}"))
}

/// Internal consistency of a summary with its own function list.
pub fn assert_summary_consistent(image: &Value) {
    let s = &image["summary"];
    let fns = image["functions"].as_array().unwrap();
    let count = |class: &str| fns.iter().filter(|f| f["class"] == class).count() as u64;
    assert_eq!(num(s, "functions"), fns.len() as u64);
    assert_eq!(num(s, "prepared"), count("prepared"));
    assert_eq!(num(s, "detourable"), count("detourable"));
    assert_eq!(num(s, "not_patchable"), count("not-patchable"));
    let live = fns.iter().filter(|f| f["live_safe"] == true).count() as u64;
    assert_eq!(num(s, "prepared_live_safe"), live);
    let reasons: u64 = s["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| num(r, "count"))
        .sum();
    assert_eq!(reasons, num(s, "not_patchable"));
}
