//! Variables a patch defines under the name of a target variable. Pure.
//!
//! A patch made by recompiling the fixed `.c` file defines every variable
//! of that file again: the patch's functions then read and write their
//! own zero-initialised copies, not the target's variables, and the
//! program misbehaves. A patch reaches a target variable through a
//! pointer (`HOTPATCH_POINTER`, `HOTPATCH_REF`); a variable it defines
//! with a target variable's name is most likely that mistake.
//!
//! [`variables`] lists the patch's own data symbols worth asking about
//! (`STT_OBJECT` in `.data*`, `.bss*`, `.rodata*`, global or local, minus
//! what the header and the toolchain define); the caller looks their names
//! up in the target, and [`copies`] says which are copies and which of the
//! patch's functions use them (RIP-relative operands that point into the
//! copy, or at a GOT slot the dynamic linker fills with its address).

use crate::image::{Image, SymbolKind, SymbolMatch};
use crate::patchfile::PatchSpec;
use crate::shorten::name;
use iced_x86::{Decoder, DecoderOptions};
use object::Endianness;
use object::elf;
use object::read::elf::{FileHeader, Rela, SectionHeader, Sym};
use std::collections::{BTreeSet, HashMap};

type Header = elf::FileHeader64<Endianness>;

/// Names the toolchain defines in every shared library (crt files, the
/// linker): never a copy of anything the author wrote.
pub const TOOLCHAIN_NAMES: &[&str] = &[
    "__dso_handle",
    "_GLOBAL_OFFSET_TABLE_",
    "_DYNAMIC",
    "__TMC_END__",
    "__TMC_LIST__",
    "__FRAME_END__",
    "__GNU_EH_FRAME_HDR",
    "_IO_stdin_used",
    "__abi_tag",
    "__data_start",
    "data_start",
    "__bss_start",
    "_edata",
    "_end",
    "__frame_dummy_init_array_entry",
    "__do_global_dtors_aux_fini_array_entry",
    "__init_array_start",
    "__init_array_end",
    "__fini_array_start",
    "__fini_array_end",
];

/// Name prefixes of symbols that are not the author's variables: the
/// header's records, the C++ objects of vague linkage (vtables, VTTs,
/// typeinfo and its names, guard variables), which every unit that needs
/// them emits again, and what the compilers add for unwinding.
pub const NOT_VARIABLE_PREFIXES: &[&str] = &[
    "hotpatch__record_",
    "_ZTV",
    "_ZTT",
    "_ZTI",
    "_ZTS",
    "_ZGV",
    // The personality routine's pointer (C++, Rust), rustc's linkage shims.
    "DW.ref.",
    "_rust_extern_with_linkage_",
];

/// Rust's standard crates and the crates they are built from: a Rust
/// patch links its own copy of what it uses of them, statics included,
/// whatever the target has (and a target built with the same toolchain
/// has the same names). Nothing a patch author can point elsewhere.
pub const RUST_STANDARD_CRATES: &[&str] = &[
    "std",
    "core",
    "alloc",
    "panic_unwind",
    "panic_abort",
    "unwind",
    "std_detect",
    "compiler_builtins",
    "rustc_demangle",
    "addr2line",
    "gimli",
    "object",
    "miniz_oxide",
    "adler2",
    "hashbrown",
    "memchr",
    "libc",
    "cfg_if",
];

/// Whether `name` is the toolchain's or the header's (see
/// [`TOOLCHAIN_NAMES`], [`NOT_VARIABLE_PREFIXES`],
/// [`RUST_STANDARD_CRATES`]), including crtstuff's local `completed.N`.
pub fn is_toolchain_name(name: &str) -> bool {
    TOOLCHAIN_NAMES.contains(&name)
        || NOT_VARIABLE_PREFIXES.iter().any(|p| name.starts_with(p))
        || name
            .strip_prefix("completed.")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        || crate::image::symbol::demangle(name).is_some_and(|d| {
            let path = d.trim_start_matches('<');
            RUST_STANDARD_CRATES
                .iter()
                .any(|c| path.strip_prefix(c).is_some_and(|rest| rest.starts_with("::")))
        })
}

/// A data symbol the patch defines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    pub name: String,
    /// In the patch file, before loading.
    pub address: u64,
    pub size: u64,
    /// In `.rodata*` or `.data.rel.ro*`.
    pub read_only: bool,
}

/// Whether a section named `section` holds variables, and whether they
/// are read-only.
fn data_section(section: &str) -> Option<bool> {
    let family = |s: &str, base: &str| s == base || s.strip_prefix(base).is_some_and(|r| r.starts_with('.'));
    if family(section, ".rodata") || family(section, ".data.rel.ro") {
        Some(true)
    } else if family(section, ".data") || family(section, ".bss") {
        Some(false)
    } else {
        None
    }
}

/// The patch's data symbols (`.symtab` and `.dynsym`, one per name and
/// address) that could be copies of target variables: not a pointer its
/// records fill, not the header's, not the toolchain's, and not a name
/// the target lookup would read as `file:name` or an address.
pub fn variables(patch: &Image, spec: &PatchSpec) -> Vec<Variable> {
    let data = patch.data();
    let Ok(header) = Header::parse(data) else {
        return Vec::new();
    };
    let Ok(endian) = header.endian() else {
        return Vec::new();
    };
    let Ok(sections) = header.sections(endian, data) else {
        return Vec::new();
    };
    let pointer = |n: &str| spec.references.iter().any(|r| r.pointer == n);
    let mut out: Vec<Variable> = Vec::new();
    for sh_type in [elf::SHT_SYMTAB, elf::SHT_DYNSYM] {
        let Ok(table) = sections.symbols(endian, data, sh_type) else {
            continue;
        };
        for (at, sym) in table.enumerate() {
            if sym.st_type() != elf::STT_OBJECT {
                continue;
            }
            let Ok(Some(index)) = table.symbol_section(endian, sym, at) else {
                continue;
            };
            let Some(read_only) = sections
                .section(index)
                .ok()
                .and_then(|s| sections.section_name(endian, s).ok())
                .and_then(|n| std::str::from_utf8(n).ok())
                .and_then(data_section)
            else {
                continue;
            };
            let Some(name) = table
                .symbol_name(endian, sym)
                .ok()
                .and_then(|n| std::str::from_utf8(n).ok())
            else {
                continue;
            };
            if name.is_empty()
                || name.contains(':')
                || name.starts_with("0x")
                || pointer(name)
                || is_toolchain_name(name)
            {
                continue;
            }
            let address = sym.st_value(endian);
            if out.iter().any(|v| v.name == name && v.address == address) {
                continue;
            }
            out.push(Variable {
                name: name.to_string(),
                address,
                size: sym.st_size(endian),
                read_only,
            });
        }
    }
    out
}

/// A patch variable with the name of a target variable.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DataCopy {
    pub name: String,
    /// Its size in the patch.
    pub patch_size: u64,
    /// The target's variables of that name (several statics in
    /// different files may share it), sorted by name.
    pub target: Vec<TargetVariable>,
    /// In a read-only section: only a problem if its contents (or its
    /// address) matter.
    pub read_only: bool,
    /// The patch's functions whose code reads, writes or takes the
    /// address of the copy (preferred names, sorted).
    pub used_by: Vec<String>,
}

/// A target variable a patch variable copies.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TargetVariable {
    /// How a record names it: `file.c:name` for a static where the
    /// symbol table says its file, else the name.
    pub name: String,
    pub size: u64,
}

/// At most this many functions are named in a message.
const USERS_SHOWN: usize = 6;

impl std::fmt::Display for DataCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = name(&self.name);
        let sizes: Vec<String> = self.target.iter().map(|t| format!("{}", t.size)).collect();
        let target = match sizes.as_slice() {
            [one] => format!("the target's is {one}"),
            many => format!(
                "the target has {} variables of that name: {}",
                many.len(),
                many.join(", ")
            ),
        };
        write!(
            f,
            "the patch defines its own variable `{n}` ({} bytes; {target} bytes): a copy, not the target's variable",
            self.patch_size
        )?;
        if self.used_by.is_empty() {
            write!(f, "; no code of the patch uses it")?;
        } else {
            let mut shown: Vec<String> = self
                .used_by
                .iter()
                .take(USERS_SHOWN)
                .map(|u| name(u).into_owned())
                .collect();
            if self.used_by.len() > USERS_SHOWN {
                shown.push(format!("{} more", self.used_by.len() - USERS_SHOWN));
            }
            write!(f, "; used by {}", shown.join(", "))?;
        }
        if self.read_only {
            write!(
                f,
                " (read-only: harmless if its contents are the target's and its address is not compared)"
            )?;
        }
        match self.target.as_slice() {
            [_] => write!(
                f,
                ". To use the target's, declare it with HOTPATCH_POINTER(type, {n}) and write HOTPATCH_VAR({n}) \
                 (or HOTPATCH_REF({n}, pointer)) instead of defining it"
            ),
            many => {
                let named: Vec<String> = many.iter().map(|t| format!("\"{}\"", name(&t.name))).collect();
                write!(
                    f,
                    ". To use one of the target's, declare a pointer and fill it with \
                     HOTPATCH_REF_NAMED(NAME, pointer), NAME one of {}, instead of defining it",
                    named.join(", ")
                )
            }
        }
    }
}

/// The copies among `variables`: those whose name `target[i]` (the
/// target's symbols named `variables[i].name`, as
/// [`crate::image::ImageFile::symbols_named`] gives them) holds a
/// variable for. Sorted by name.
pub fn copies(patch: &Image, variables: &[Variable], target: &[Vec<SymbolMatch>]) -> Vec<DataCopy> {
    let mut found: Vec<(&Variable, Vec<TargetVariable>)> = Vec::new();
    for (v, hits) in variables.iter().zip(target) {
        let mut seen: Vec<u64> = Vec::new();
        let mut target = Vec::new();
        for h in hits.iter().filter(|h| h.kind == SymbolKind::Variable) {
            if !seen.contains(&h.address) {
                seen.push(h.address);
                target.push(TargetVariable {
                    name: match &h.file {
                        Some(file) if !h.global => format!("{file}:{}", h.name),
                        _ => h.name.clone(),
                    },
                    size: h.size,
                });
            }
        }
        if !target.is_empty() {
            target.sort_by(|a, b| a.name.cmp(&b.name));
            found.push((v, target));
        }
    }
    if found.is_empty() {
        return Vec::new();
    }
    let copied: Vec<&Variable> = found.iter().map(|(v, _)| *v).collect();
    let users = users(patch, &copied);
    let mut out: Vec<DataCopy> = found
        .into_iter()
        .zip(users)
        .map(|((v, target), used_by)| DataCopy {
            name: v.name.clone(),
            patch_size: v.size,
            target,
            read_only: v.read_only,
            used_by: used_by.into_iter().collect(),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out.dedup_by(|a, b| {
        // One name at two addresses (a global and a static): one warning.
        if a.name == b.name {
            b.used_by.append(&mut a.used_by);
            b.used_by.sort();
            b.used_by.dedup();
            true
        } else {
            false
        }
    });
    out
}

/// For each of `variables`, the names of the patch functions whose code
/// points into it, directly or through a GOT slot.
fn users(patch: &Image, variables: &[&Variable]) -> Vec<BTreeSet<String>> {
    let mut out = vec![BTreeSet::new(); variables.len()];
    let got = got_slots(patch);
    let by_name: HashMap<&str, Vec<usize>> =
        variables
            .iter()
            .enumerate()
            .fold(HashMap::new(), |mut m, (i, v)| {
                m.entry(v.name.as_str()).or_default().push(i);
                m
            });
    let inside = |address: u64| -> Vec<usize> {
        variables
            .iter()
            .enumerate()
            .filter(|(_, v)| address >= v.address && address < v.address.saturating_add(v.size.max(1)))
            .map(|(i, _)| i)
            .collect()
    };
    for f in patch.functions() {
        let Some(code) = patch.bytes_at(f.address, f.size).filter(|c| !c.is_empty()) else {
            continue;
        };
        let mut decoder = Decoder::with_ip(64, code, f.address, DecoderOptions::NONE);
        for insn in &mut decoder {
            if !insn.is_ip_rel_memory_operand() {
                continue;
            }
            let address = insn.ip_rel_memory_address();
            let mut hit = inside(address);
            if let Some(symbol) = got.get(&address) {
                hit.extend(by_name.get(symbol.as_str()).into_iter().flatten());
            }
            for i in hit {
                out[i].insert(f.name().display().to_string());
            }
        }
    }
    out
}

/// GOT slots (and other words) the dynamic linker fills with a named
/// symbol's address: `r_offset` → the `.dynsym` name of every
/// `R_X86_64_GLOB_DAT` and `R_X86_64_64` relocation.
fn got_slots(patch: &Image) -> HashMap<u64, String> {
    let mut map = HashMap::new();
    let data = patch.data();
    let Ok(header) = Header::parse(data) else {
        return map;
    };
    let Ok(endian) = header.endian() else {
        return map;
    };
    let Ok(sections) = header.sections(endian, data) else {
        return map;
    };
    let Ok(dynsym) = sections.symbols(endian, data, elf::SHT_DYNSYM) else {
        return map;
    };
    for section in sections.iter() {
        if section.sh_flags(endian) & u64::from(elf::SHF_ALLOC) == 0 {
            continue;
        }
        let Ok(Some((relas, _))) = section.rela(endian, data) else {
            continue;
        };
        for rela in relas {
            if !matches!(
                rela.r_type(endian, false),
                elf::R_X86_64_GLOB_DAT | elf::R_X86_64_64
            ) {
                continue;
            }
            let index = object::SymbolIndex(rela.r_sym(endian, false) as usize);
            let Some(name) = dynsym
                .symbol(index)
                .ok()
                .and_then(|s| dynsym.symbol_name(endian, s).ok())
                .and_then(|n| std::str::from_utf8(n).ok())
            else {
                continue;
            };
            map.insert(rela.r_offset(endian), name.to_string());
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ImageFile;
    use crate::patchfile::CommandLineRecords;
    use hotpatch_testkit::build::{build_sources, include_arg};

    #[test]
    fn toolchain_names() {
        for n in [
            "__dso_handle",
            "_GLOBAL_OFFSET_TABLE_",
            "__TMC_END__",
            "completed.0",
            "completed.7698",
            "hotpatch__record_3",
            "_ZTV3Foo",
            "_ZGVZ1fvE1x",
            // Rust's standard crates' statics (legacy and v0 manglings).
            "_ZN3std2io5stdio6STDOUT17h0123456789abcdefE",
            "_ZN4core3fmt3num3imp7DEC_LUT17h0123456789abcdefE",
            "_RNvNtNtCs1234_3std2io5stdio6STDOUT",
            "_RNvNtCsiGO2KWI1TB6_12panic_unwind3imp6CANARY",
            "DW.ref.__gxx_personality_v0",
            "_rust_extern_with_linkage_e28293b1aa0f68bd___dso_handle",
        ] {
            assert!(is_toolchain_name(n), "{n}");
        }
        for n in [
            "counter",
            "completed",
            "completed.",
            "completed.x",
            "done.0",
            "_ZN3foo7counterE",
            "_ZN7stdlike7COUNTER17h0123456789abcdefE",
        ] {
            assert!(!is_toolchain_name(n), "{n}");
        }
    }

    #[test]
    fn data_sections() {
        assert_eq!(data_section(".data"), Some(false));
        assert_eq!(data_section(".bss.counter"), Some(false));
        assert_eq!(data_section(".data.rel.local"), Some(false));
        assert_eq!(data_section(".rodata"), Some(true));
        assert_eq!(data_section(".rodata.cst8"), Some(true));
        assert_eq!(data_section(".data.rel.ro"), Some(true));
        assert_eq!(data_section(".data.rel.ro.local"), Some(true));
        for s in [
            ".text",
            ".got",
            ".dataX",
            ".bssy",
            ".init_array",
            ".tbss",
            ".eh_frame",
        ] {
            assert_eq!(data_section(s), None, "{s}");
        }
    }

    #[test]
    fn message_names_sizes_users_and_the_fix() {
        let target = |name: &str, size| TargetVariable {
            name: name.into(),
            size,
        };
        let copy = DataCopy {
            name: "counter".into(),
            patch_size: 8,
            target: vec![target("a.c:counter", 4), target("b.c:counter", 8)],
            read_only: false,
            used_by: (0..8).map(|i| format!("f{i}")).collect(),
        };
        let m = copy.to_string();
        assert!(
            m.contains(
                "own variable `counter` (8 bytes; the target has 2 variables of that name: 4, 8 bytes)"
            ),
            "{m}"
        );
        assert!(m.contains("used by f0, f1, f2, f3, f4, f5, 2 more"), "{m}");
        assert!(
            m.contains(r#"HOTPATCH_REF_NAMED(NAME, pointer), NAME one of "a.c:counter", "b.c:counter""#),
            "{m}"
        );
        assert!(!m.contains("read-only"), "{m}");
        let unused = DataCopy {
            used_by: Vec::new(),
            read_only: true,
            target: vec![target("counter", 16)],
            ..copy
        };
        let m = unused.to_string();
        assert!(
            m.contains("the target's is 16 bytes") && m.contains("no code of the patch uses it"),
            "{m}"
        );
        assert!(
            m.contains("HOTPATCH_POINTER(type, counter)") && m.contains("HOTPATCH_VAR(counter)"),
            "{m}"
        );
        assert!(m.contains("read-only"), "{m}");
    }

    const TARGET: &str = r#"
long counter;                                   /* global: reached through the GOT */
static int hits;                                /* static: RIP-relative */
static const int table[4] = {1, 2, 3, 4};
long served;
static int untouched;
__attribute__((noinline)) long work(long x) { hits++; counter += x; untouched ^= 1; return table[x & 3] + hits + served + untouched; }
int main(int argc, char **argv) { (void)argv; return (int)work(argc); }
"#;

    /// The classic mistake: the fixed file recompiled as the patch.
    const PATCH: &str = r#"
#include "hotpatch.h"
HOTPATCH_POINTER(long, served);
long counter;
static int hits;
static const int table[4] = {1, 2, 3, 4};
static int untouched;
long patch_only;
__attribute__((noinline)) static long bump(void) { return ++hits; }
__attribute__((visibility("default"))) const int *table_at(long x) { return &table[x & 3]; }
long work_fixed(long x) { counter += x; patch_only++; untouched ^= 1; return bump() + *table_at(x) + HOTPATCH_VAR(served) + untouched; }
HOTPATCH_REPLACE(work, work_fixed);
"#;

    #[test]
    fn a_recompiled_file_copies_the_target_variables() {
        let dir = tempfile::tempdir().unwrap();
        let exe = build_sources(dir.path(), "gcc", "target", &[("target.c", TARGET)], &["-O2"]);
        let so = build_sources(
            dir.path(),
            "gcc",
            "patch.so",
            &[("patch.c", PATCH)],
            &["-O2", "-shared", "-fPIC", &include_arg()],
        );
        let patch = Image::open(&so).unwrap();
        let spec = PatchSpec::from_image(&patch, &CommandLineRecords::default()).unwrap();
        let vars = variables(&patch, &spec);
        let mut names: Vec<&str> = vars.iter().map(|v| v.name.as_str()).collect();
        names.sort();
        // Not the pointer, not the records, not crtstuff's.
        assert_eq!(names, ["counter", "hits", "patch_only", "table", "untouched"]);
        let target = ImageFile::open(&exe, &exe).unwrap();
        let hits = target.symbols_named(&names_of(&vars)).unwrap();
        let found = copies(&patch, &vars, &hits);
        type Summary<'a> = (&'a str, u64, Vec<(&'a str, u64)>, bool, Vec<&'a str>);
        let summary: Vec<Summary> = found
            .iter()
            .map(|c| {
                (
                    c.name.as_str(),
                    c.patch_size,
                    c.target.iter().map(|t| (t.name.as_str(), t.size)).collect(),
                    c.read_only,
                    c.used_by.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("counter", 8, vec![("counter", 8)], false, vec!["work_fixed"]),
                ("hits", 4, vec![("target.c:hits", 4)], false, vec!["bump"]),
                ("table", 16, vec![("target.c:table", 16)], true, vec!["table_at"]),
                (
                    "untouched",
                    4,
                    vec![("target.c:untouched", 4)],
                    false,
                    vec!["work_fixed"]
                ),
            ]
        );
    }

    #[test]
    fn a_patch_with_pointers_only_copies_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let exe = build_sources(dir.path(), "gcc", "target", &[("target.c", TARGET)], &["-O2"]);
        let source = r#"
#include "hotpatch.h"
HOTPATCH_POINTER(long, counter);
HOTPATCH_POINTER(int, hits);
HOTPATCH_ORIGINAL(long, work, (long));
long work_fixed(long x) { HOTPATCH_VAR(counter) += x; return HOTPATCH_VAR(hits) + orig_work(x); }
HOTPATCH_REPLACE(work, work_fixed);
"#;
        let so = build_sources(
            dir.path(),
            "gcc",
            "patch.so",
            &[("patch.c", source)],
            &["-O2", "-shared", "-fPIC", &include_arg()],
        );
        let patch = Image::open(&so).unwrap();
        let spec = PatchSpec::from_image(&patch, &CommandLineRecords::default()).unwrap();
        let vars = variables(&patch, &spec);
        assert_eq!(vars, Vec::new());
        let target = ImageFile::open(&exe, &exe).unwrap();
        let hits = target.symbols_named(&names_of(&vars)).unwrap();
        assert_eq!(copies(&patch, &vars, &hits), Vec::new());
    }

    fn names_of(vars: &[Variable]) -> Vec<&str> {
        vars.iter().map(|v| v.name.as_str()).collect()
    }
}
