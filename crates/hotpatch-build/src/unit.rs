//! One compiled object (a translation unit built with function and data
//! sections), read into what the comparison needs: its functions and data
//! items, each with its bytes (relocated fields zeroed) and its references
//! named so that they do not depend on where the linker or the assembler
//! put things. Pure: bytes in, model out.

use object::elf;
use object::read::elf::ElfFile64;
use object::{Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget};
use std::collections::{BTreeMap, BTreeSet};

/// What a compiled translation unit defines.
#[derive(Debug, Clone, Default)]
pub struct Unit {
    /// The source file its `STT_FILE` symbol names: the binary's symbol
    /// table names the unit's statics after it (`file.c:name`).
    pub source: Option<String>,
    pub functions: Vec<Item>,
    pub data: Vec<Item>,
    /// Functions an init array or `.ctors` refers to: they run once, at start.
    pub constructors: BTreeSet<String>,
    /// Built by gcc (its `.comment`): gcc's interprocedural register
    /// allocation lets a caller rely on what a callee of its unit does not
    /// clobber; clang and rustc (LLVM) do not do that by default.
    pub gcc: bool,
}

impl Unit {
    /// Whether the unit's function or data `name` is global (a name it does
    /// not define counts as global: it is someone else's).
    pub fn is_global(&self, name: &str) -> bool {
        self.functions
            .iter()
            .chain(&self.data)
            .find(|i| i.name == name)
            .is_none_or(|i| i.global)
    }

    /// How the running binary names `name` of this unit.
    pub fn shown(&self, name: &str) -> String {
        crate::binary::query(self.source.as_deref(), name, self.is_global(name))
    }
}

/// What kind of memory an item lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    Code,
    /// Written by the program: `.data`, `.bss`.
    Writable,
    /// Never written after load: `.rodata`, `.data.rel.ro`.
    Const,
    /// Thread-local.
    ThreadLocal,
}

/// A function or a data object of a unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub name: String,
    pub global: bool,
    pub section: String,
    pub class: Class,
    pub size: u64,
    /// The bytes, with every relocated field zeroed (none for `.bss`: its
    /// size says it all).
    pub bytes: Vec<u8>,
    pub refs: Vec<Ref>,
}

impl Item {
    /// A compiler-made part or clone: `.cold`, `.part.N`, `.isra.N`,
    /// `.constprop.N`, or a numbered static local (`count.0`).
    pub fn is_compiler_named(&self) -> bool {
        self.name.contains('.')
    }
}

/// One relocation of an item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ref {
    /// Offset within the item.
    pub offset: u64,
    pub r_type: u32,
    pub target: Target,
    /// The addend, relative to the target symbol (not to its section).
    pub addend: i64,
}

/// What a relocation points at, named independently of layout.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// A named symbol (defined in the unit or not).
    Symbol(String),
    /// A merged string or constant, by content.
    Content(Vec<u8>),
    /// An anonymous part of a section (a jump table, a literal pool).
    Section(String),
}

impl Target {
    pub fn symbol(&self) -> Option<&str> {
        match self {
            Target::Symbol(s) => Some(s),
            _ => None,
        }
    }
}

/// Why an object cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum UnitError {
    #[error("not an ELF x86-64 object: {0}")]
    Parse(#[from] object::Error),
    #[error("not a relocatable object (ET_REL)")]
    NotRelocatable,
    #[error("section `{section}`: {what}")]
    Section { section: String, what: String },
}

/// The size of the field a relocation type writes.
pub fn field_size(r_type: u32) -> usize {
    match r_type {
        elf::R_X86_64_NONE | elf::R_X86_64_TLSDESC_CALL => 0,
        elf::R_X86_64_8 | elf::R_X86_64_PC8 => 1,
        elf::R_X86_64_16 | elf::R_X86_64_PC16 => 2,
        elf::R_X86_64_64
        | elf::R_X86_64_DTPMOD64
        | elf::R_X86_64_DTPOFF64
        | elf::R_X86_64_TPOFF64
        | elf::R_X86_64_PC64
        | elf::R_X86_64_GOTOFF64
        | elf::R_X86_64_GOT64
        | elf::R_X86_64_GOTPCREL64
        | elf::R_X86_64_GOTPC64
        | elf::R_X86_64_GOTPLT64
        | elf::R_X86_64_PLTOFF64
        | elf::R_X86_64_SIZE64 => 8,
        elf::R_X86_64_TLSDESC => 16,
        _ => 4,
    }
}

/// Whether a relocation is relative to the address of its own field.
pub fn pc_relative(r_type: u32) -> bool {
    matches!(
        r_type,
        elf::R_X86_64_PC32
            | elf::R_X86_64_PLT32
            | elf::R_X86_64_GOTPCREL
            | elf::R_X86_64_GOTPCRELX
            | elf::R_X86_64_REX_GOTPCRELX
            | elf::R_X86_64_PC64
            | elf::R_X86_64_GOTPC32
            | elf::R_X86_64_TLSGD
            | elf::R_X86_64_TLSLD
            | elf::R_X86_64_GOTTPOFF
            | elf::R_X86_64_GOTPC32_TLSDESC
    )
}

/// The bytes around a relocated field that the linker may rewrite when it
/// relaxes the instruction (GOT loads into `lea`, TLS models into local
/// exec), as `(before, after)` the field's start.
pub fn relaxed_span(r_type: u32) -> (u64, u64) {
    match r_type {
        elf::R_X86_64_GOTPCRELX | elf::R_X86_64_REX_GOTPCRELX | elf::R_X86_64_GOTTPOFF => (3, 4),
        elf::R_X86_64_GOTPC32_TLSDESC => (3, 4),
        elf::R_X86_64_TLSDESC_CALL => (0, 2),
        // lea rdi,[rip+x@tlsgd]; call __tls_get_addr → mov rax,fs:0; lea rax,[rax+x@tpoff]
        elf::R_X86_64_TLSGD => (4, 12),
        elf::R_X86_64_TLSLD => (3, 9),
        r => (0, field_size(r) as u64),
    }
}

/// `(offset, r_type, addend, symbol)` of one relocation as read.
type RawRelocation = (u64, u32, i64, Option<object::SymbolIndex>);

struct SectionInfo {
    name: String,
    flags: u64,
    entsize: u64,
    data: Vec<u8>,
    /// Named symbols defined in it: (value, size, name).
    symbols: Vec<(u64, u64, String)>,
}

fn class_of(name: &str, flags: u64) -> Class {
    let flags = flags as u32;
    if flags & elf::SHF_TLS != 0 {
        Class::ThreadLocal
    } else if flags & elf::SHF_EXECINSTR != 0 {
        Class::Code
    } else if flags & elf::SHF_WRITE != 0 && !name.starts_with(".data.rel.ro") {
        Class::Writable
    } else {
        Class::Const
    }
}

/// Read a relocatable object.
pub fn read(data: &[u8]) -> Result<Unit, UnitError> {
    let file = ElfFile64::<object::Endianness>::parse(data)?;
    if file.elf_header().e_type.get(file.endian()) != elf::ET_REL {
        return Err(UnitError::NotRelocatable);
    }
    let mut sections: BTreeMap<usize, SectionInfo> = BTreeMap::new();
    for s in file.sections() {
        let (flags, entsize) = match s.flags() {
            object::SectionFlags::Elf { sh_flags } => {
                (sh_flags, s.elf_section_header().sh_entsize.get(file.endian()))
            }
            _ => (0, 0),
        };
        let name = s.name().unwrap_or("").to_string();
        let data = if s.kind() == object::SectionKind::UninitializedData
            || s.kind() == object::SectionKind::UninitializedTls
        {
            Vec::new()
        } else {
            s.data()
                .map_err(|e| UnitError::Section {
                    section: name.clone(),
                    what: e.to_string(),
                })?
                .to_vec()
        };
        sections.insert(
            s.index().0,
            SectionInfo {
                name,
                flags,
                entsize,
                data,
                symbols: Vec::new(),
            },
        );
    }
    let mut unit = Unit::default();
    let mut files = 0usize;
    unit.gcc = file
        .section_by_name(".comment")
        .and_then(|c| c.data().ok())
        .is_some_and(|d| d.windows(4).any(|w| w == b"GCC:"));
    // Items by section, to attach relocations.
    let mut defined: Vec<(usize, u64, u64, bool, String, bool)> = Vec::new();
    for sym in file.symbols() {
        if sym.kind() == object::SymbolKind::File {
            files += 1;
            if unit.source.is_none() {
                unit.source = sym.name().ok().map(str::to_string);
            }
            continue;
        }
        let Some(index) = sym.section_index() else {
            continue;
        };
        let Ok(name) = sym.name() else { continue };
        if name.is_empty() || sym.kind() == object::SymbolKind::Section {
            continue;
        }
        let is_function = sym.kind() == object::SymbolKind::Text;
        let is_data = matches!(sym.kind(), object::SymbolKind::Data | object::SymbolKind::Tls);
        if let Some(info) = sections.get_mut(&index.0) {
            info.symbols.push((sym.address(), sym.size(), name.to_string()));
        }
        if (is_function || is_data) && sym.size() > 0 {
            defined.push((
                index.0,
                sym.address(),
                sym.size(),
                sym.is_global() || sym.is_weak(),
                name.to_string(),
                is_function,
            ));
        }
    }
    // Objects merged from several (a Rust crate's codegen units) have no
    // one file: their local names are unique by their hashes.
    if files > 1 {
        unit.source = None;
    }
    for info in sections.values_mut() {
        info.symbols.sort();
    }
    // Relocations by the section they apply to.
    let mut relocations: BTreeMap<usize, Vec<RawRelocation>> = BTreeMap::new();
    for s in file.sections() {
        for (offset, r) in s.relocations() {
            let RelocationFlags::Elf { r_type } = r.flags() else {
                continue;
            };
            let symbol = match r.target() {
                RelocationTarget::Symbol(i) => Some(i),
                _ => None,
            };
            relocations
                .entry(s.index().0)
                .or_default()
                .push((offset, r_type, r.addend(), symbol));
        }
    }
    let target_of = |symbol: Option<object::SymbolIndex>, addend: i64, bias: i64| -> (Target, i64) {
        let Some(sym) = symbol.and_then(|i| file.symbol_by_index(i).ok()) else {
            return (Target::Section(String::new()), addend);
        };
        if sym.kind() != object::SymbolKind::Section {
            return (Target::Symbol(sym.name().unwrap_or("").to_string()), addend);
        }
        let Some(info) = sym.section_index().and_then(|i| sections.get(&i.0)) else {
            return (Target::Section(String::new()), addend);
        };
        let effective = addend.wrapping_add(bias);
        if effective >= 0 {
            let at = effective as u64;
            if let Some((value, _, name)) = info
                .symbols
                .iter()
                .rev()
                .find(|(value, size, _)| *value <= at && at < value.saturating_add((*size).max(1)))
            {
                return (Target::Symbol(name.clone()), addend - *value as i64);
            }
            let merge = info.flags & u64::from(elf::SHF_MERGE) != 0;
            if merge && info.flags & u64::from(elf::SHF_STRINGS) != 0 {
                let rest = info.data.get(at as usize..).unwrap_or(&[]);
                let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
                return (Target::Content(rest[..end].to_vec()), addend - effective);
            }
            if merge && info.entsize > 0 {
                let rest = info.data.get(at as usize..).unwrap_or(&[]);
                let n = (info.entsize as usize).min(rest.len());
                return (Target::Content(rest[..n].to_vec()), addend - effective);
            }
        }
        (Target::Section(info.name.clone()), addend)
    };
    for (index, value, size, global, name, is_function) in defined {
        let Some(info) = sections.get(&index) else {
            continue;
        };
        let class = class_of(&info.name, info.flags);
        let mut bytes = if info.data.is_empty() {
            // .bss: all zeros, compared by size (it may be huge).
            Vec::new()
        } else {
            info.data
                .get(value as usize..value.saturating_add(size) as usize)
                .ok_or_else(|| UnitError::Section {
                    section: info.name.clone(),
                    what: format!("`{name}` ({size} bytes at {value:#x}) is past the section's end"),
                })?
                .to_vec()
        };
        let spans = if is_function {
            instruction_ends(&bytes)
        } else {
            Vec::new()
        };
        let mut refs = Vec::new();
        for &(offset, r_type, addend, symbol) in relocations.get(&index).map(Vec::as_slice).unwrap_or(&[]) {
            if offset < value || offset >= value.saturating_add(size) {
                continue;
            }
            let at = offset - value;
            let bias = if pc_relative(r_type) {
                spans
                    .iter()
                    .find(|&&(start, end)| start <= at && at < end)
                    .map(|&(_, end)| (end - at) as i64)
                    .unwrap_or(4)
            } else {
                0
            };
            let (target, addend) = target_of(symbol, addend, bias);
            let n = field_size(r_type);
            for b in bytes.iter_mut().skip(at as usize).take(n) {
                *b = 0;
            }
            refs.push(Ref {
                offset: at,
                r_type,
                target,
                addend,
            });
        }
        let item = Item {
            name,
            global,
            section: info.name.clone(),
            class: if is_function { Class::Code } else { class },
            size,
            bytes,
            refs,
        };
        if is_function {
            unit.functions.push(item);
        } else {
            unit.data.push(item);
        }
    }
    for (index, info) in &sections {
        let n = &info.name;
        if n.starts_with(".init_array") || n.starts_with(".ctors") || n.starts_with(".preinit_array") {
            for &(_, _, addend, symbol) in relocations.get(index).map(Vec::as_slice).unwrap_or(&[]) {
                if let (Target::Symbol(s), _) = target_of(symbol, addend, 0) {
                    unit.constructors.insert(s);
                }
            }
        }
    }
    Ok(unit)
}

/// `(start, end)` of each instruction of a function's code.
fn instruction_ends(code: &[u8]) -> Vec<(u64, u64)> {
    use iced_x86::{Decoder, DecoderOptions};
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut spans = Vec::new();
    while decoder.can_decode() {
        let insn = decoder.decode();
        spans.push((insn.ip(), insn.next_ip()));
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_sizes_cover_the_common_types() {
        assert_eq!(field_size(elf::R_X86_64_PC32), 4);
        assert_eq!(field_size(elf::R_X86_64_PLT32), 4);
        assert_eq!(field_size(elf::R_X86_64_GOTOFF64), 8);
        assert_eq!(field_size(elf::R_X86_64_64), 8);
        assert_eq!(field_size(elf::R_X86_64_NONE), 0);
        assert_eq!(relaxed_span(elf::R_X86_64_REX_GOTPCRELX), (3, 4));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(read(b"not an object").is_err());
        assert!(read(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]).is_err());
    }

    #[test]
    fn instruction_ends_of_a_call_and_a_ret() {
        // call rel32; ret
        let spans = instruction_ends(&[0xe8, 0, 0, 0, 0, 0xc3]);
        assert_eq!(spans, vec![(0, 5), (5, 6)]);
    }
}
