//! The patch's objects: the fixed units compiled once more for the patch
//! (`-fPIC -mcmodel=large -fvisibility=hidden`), rewritten so that the
//! linker keeps only the chosen functions and what they need, and every
//! reference to the running binary's own code and data becomes a record
//! that `hotpatch apply` fills in.
//!
//! The large code model is what makes binding possible at any distance: a
//! dlopen'ed patch sits far more than 2 GiB from a PIE executable, and in
//! that model every symbol reference is a 64-bit field (`movabs`):
//!
//! - `R_X86_64_GOTOFF64`/`PLTOFF64` to a binary symbol S (a static or
//!   hidden variable, any function): the field must hold `&S − GOT`. The
//!   relocation is dropped and a `rel64 S SITE ADDEND BASE` record
//!   written, SITE a symbol at the field and BASE an exported function of
//!   the patch, ADDEND corrected by BASE's distance from the GOT once the
//!   link has placed both (a linker-made symbol cannot be exported).
//! - `R_X86_64_64` to S (a pointer in data): `ref S SITE ADDEND`.
//! - `R_X86_64_GOT64` (or a `GOTPCREL` form) to S (an `extern` variable or a
//!   function's address): the GOT entry becomes a slot of the patch, filled
//!   by `ref S SLOT`.
//! - Anything else to a binary symbol (a 32-bit displacement) cannot reach
//!   it and is refused.
//!
//! Pure: object bytes in, object bytes and records out.

use crate::binary::Binary;
use crate::compare::{Changes, stable_name};
use crate::select::{Refusal, Selection};
use crate::unit::{Class, pc_relative};
use object::build::Id;
use object::build::elf::{Builder, SectionData, SectionId, SymbolId};
use object::elf;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// Every symbol the patch exports starts with this.
pub const EXPORT_PREFIX: &str = "__hotpatch_";
/// The replacement functions' names start with this.
pub const REPLACEMENT_PREFIX: &str = "__hotpatch_fn_";

/// Names the static linker defines in every output: the patch's own.
const LINKER_NAMES: &[&str] = &[
    "_GLOBAL_OFFSET_TABLE_",
    "_DYNAMIC",
    "__dso_handle",
    "__ehdr_start",
    "__TMC_END__",
    "_init",
    "_fini",
    "_end",
    "_edata",
    "__bss_start",
];

/// One fixed unit to emit.
pub struct PatchUnit<'a> {
    /// The unit's index in the selection.
    pub index: usize,
    /// Its `STT_FILE` name: how the binary names its statics.
    pub source: Option<String>,
    /// The patch compile of the unit.
    pub object: Vec<u8>,
    pub changes: &'a Changes,
}

/// A reference bound to the running binary.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Binding {
    /// The binary's name for it (`file.c:name` for a static).
    pub symbol: String,
    /// How: `rel64` (an offset in code), `ref` (an address in data), `slot`.
    pub how: &'static str,
}

/// The rewritten objects and what they need.
#[derive(Debug, Default)]
pub struct Emitted {
    pub objects: Vec<Vec<u8>>,
    /// The bound references, as records once the link has placed the GOT.
    pub records: Vec<BoundRecord>,
    pub bindings: BTreeSet<Binding>,
    /// Functions and data the patch carries besides the chosen functions.
    pub carried: BTreeSet<String>,
    /// Per unit, the names of the sections the linker must drop.
    pub dropped: Vec<BTreeSet<String>>,
    pub refusals: Vec<Refusal>,
}

#[derive(Debug, thiserror::Error)]
pub enum EmitError {
    #[error("{source_name}: the patch compile's object cannot be read or written: {what}")]
    Object { source_name: String, what: String },
    #[error(
        "{source_name}: the patch compile has no out-of-line `{name}` (the compiler inlined it in this build); nothing to replace it with"
    )]
    Missing { source_name: String, name: String },
}

/// A record that binds a reference to the running binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BoundRecord {
    /// The field at `site` holds `&target + addend − GOT`.
    GotOffset {
        target: String,
        site: String,
        addend: i64,
    },
    /// The pointer at `pointer` holds `&target + addend`.
    Address {
        target: String,
        pointer: String,
        addend: i64,
    },
}

impl BoundRecord {
    /// The record's text (without `hotpatch-v1 `), for a patch whose GOT is
    /// `got_minus_base` bytes after its exported symbol `base`.
    pub fn render(&self, base: &str, got_minus_base: i64) -> String {
        match self {
            BoundRecord::GotOffset { target, site, addend } => {
                format!(
                    "rel64 {target} {site} {} {base}",
                    addend.wrapping_sub(got_minus_base)
                )
            }
            BoundRecord::Address {
                target,
                pointer,
                addend: 0,
            } => format!("ref {target} {pointer}"),
            BoundRecord::Address {
                target,
                pointer,
                addend,
            } => format!("ref {target} {pointer} {addend}"),
        }
    }
}

/// What a reference from kept code goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Dest {
    /// Part of the patch: follow it.
    Inside(Option<SectionId>),
    /// The running binary's symbol, by the binary's name.
    Binary { query: String, thread_local: bool },
    /// Neither: left to the dynamic linker (a library function).
    Outside,
    /// Refused (data the patch cannot bind and must not copy).
    Refused(String),
}

/// The exported name of a replacement function.
pub fn replacement_name(unit: usize, name: &str, global: bool) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if global {
        format!("{REPLACEMENT_PREFIX}{clean}")
    } else {
        format!("{REPLACEMENT_PREFIX}{unit}_{clean}")
    }
}

/// Rewrite the units' patch objects.
pub fn emit(
    units: &[PatchUnit<'_>],
    selection: &Selection,
    binary: &Binary<'_>,
) -> Result<Emitted, EmitError> {
    let mut out = Emitted::default();
    // Replaced global functions are renamed in every object that names them.
    let global_renames: HashMap<String, String> = selection
        .chosen
        .iter()
        .filter(|c| c.replaced && c.global)
        .map(|c| (c.name.clone(), replacement_name(c.unit, &c.name, true)))
        .collect();
    let chosen_globals: HashSet<&str> = selection
        .chosen
        .iter()
        .filter(|c| c.global)
        .map(|c| c.name.as_str())
        .collect();
    for unit in units {
        let source_name = unit
            .source
            .clone()
            .unwrap_or_else(|| format!("unit {}", unit.index));
        let err = |what: String| EmitError::Object {
            source_name: source_name.clone(),
            what,
        };
        let plain = ungrouped(&unit.object).map_err(|e| err(e.to_string()))?;
        let mut b = Builder::read(plain.as_slice()).map_err(|e| err(e.to_string()))?;
        for s in b.sections.iter_mut() {
            if s.sh_type == elf::SHT_PROGBITS
                && (s.name.as_slice() == b".group" || s.name.as_slice() == b".llvm_addrsig")
            {
                s.delete = true;
            }
        }
        // clang names sections in the symbol string table; the writer wants
        // a table of its own.
        if !b
            .sections
            .iter()
            .any(|s| matches!(s.data, SectionData::SectionString))
        {
            let s = b.sections.add();
            s.name = b".shstrtab".to_vec().into();
            s.sh_type = elf::SHT_STRTAB;
            s.sh_addralign = 1;
            s.data = SectionData::SectionString;
        }
        let chosen: Vec<&crate::select::Chosen> =
            selection.chosen.iter().filter(|c| c.unit == unit.index).collect();
        // By name without LLVM's per-build `.llvm.N` suffix.
        let chosen_names: HashSet<&str> = chosen.iter().map(|c| stable_name(&c.name)).collect();
        let new_data: HashSet<&str> = selection
            .new_data
            .iter()
            .filter(|d| d.0 == unit.index)
            .map(|d| d.1.as_str())
            .collect();
        let constants: HashSet<&str> = selection
            .constants
            .iter()
            .filter(|d| d.0 == unit.index)
            .map(|d| d.1.as_str())
            .collect();
        // Named symbols by section, to name what a section symbol points into.
        let mut by_section: HashMap<usize, Vec<(u64, u64, SymbolId)>> = HashMap::new();
        for s in &b.symbols {
            if let Some(sec) = s.section
                && !s.name.is_empty()
                && matches!(
                    s.st_type(),
                    elf::STT_FUNC | elf::STT_OBJECT | elf::STT_TLS | elf::STT_NOTYPE
                )
            {
                by_section
                    .entry(sec.index())
                    .or_default()
                    .push((s.st_value, s.st_size, s.id()));
            }
        }
        let section_class = |id: SectionId| {
            let s = b.sections.get(id);
            let flags = s.sh_flags as u32;
            if flags & elf::SHF_TLS != 0 {
                Class::ThreadLocal
            } else if flags & elf::SHF_EXECINSTR != 0 {
                Class::Code
            } else if flags & elf::SHF_WRITE != 0 && !s.name.as_slice().starts_with(b".data.rel.ro") {
                Class::Writable
            } else {
                Class::Const
            }
        };
        // Where a relocation's symbol (plus addend) goes, and the addend
        // relative to the named symbol.
        let dest_of = |sym: SymbolId, addend: i64, r_type: u32| -> (Dest, i64, Option<String>) {
            let s = b.symbols.get(sym);
            let (s, addend) = if s.st_type() == elf::STT_SECTION {
                let effective = addend + if pc_relative(r_type) { 4 } else { 0 };
                let named = s
                    .section
                    .and_then(|sec| by_section.get(&sec.index()))
                    .and_then(|list| {
                        list.iter()
                            .find(|(v, size, _)| {
                                effective >= 0
                                    && *v <= effective as u64
                                    && (effective as u64) < v.saturating_add((*size).max(1))
                            })
                            .map(|&(v, _, id)| (b.symbols.get(id), addend - v as i64))
                    });
                match named {
                    Some(n) => n,
                    None => return (Dest::Inside(s.section), addend, None),
                }
            } else {
                (s, addend)
            };
            let name = String::from_utf8_lossy(s.name.as_slice()).into_owned();
            let global = s.st_bind() != elf::STB_LOCAL;
            let dest = match s.section {
                Some(sec) => {
                    let class = if s.st_type() == elf::STT_FUNC {
                        Class::Code
                    } else {
                        section_class(sec)
                    };
                    let binary_name = unit.changes.binary_name(&name);
                    let found = binary.resolve(unit.source.as_deref(), &binary_name, global);
                    if chosen_names.contains(stable_name(&name)) {
                        Dest::Inside(Some(sec))
                    } else if class == Class::Code {
                        match found {
                            Some((_, query)) if !name.contains('.') => Dest::Binary {
                                query,
                                thread_local: false,
                            },
                            _ => Dest::Inside(Some(sec)),
                        }
                    } else if new_data.contains(name.as_str()) || constants.contains(name.as_str()) {
                        Dest::Inside(Some(sec))
                    } else {
                        match (found, class) {
                            (Some((_, query)), _) => Dest::Binary {
                                query,
                                thread_local: class == Class::ThreadLocal,
                            },
                            (None, Class::Const) => Dest::Inside(Some(sec)),
                            (None, _) => Dest::Refused(format!(
                                "the fixed code uses `{name}`, which the running binary's symbol table does not have: the patch cannot bind it, and a copy would not be the program's"
                            )),
                        }
                    }
                }
                None if chosen_globals.contains(name.as_str()) => Dest::Inside(None),
                // The patch's own, made by its link.
                None if LINKER_NAMES.contains(&name.as_str()) => Dest::Outside,
                None => match binary.symbol(None, &name, true) {
                    Some(found) => Dest::Binary {
                        query: found.name,
                        thread_local: false,
                    },
                    None => Dest::Outside,
                },
            };
            (dest, addend, Some(name))
        };
        // The sections the patch keeps, from the chosen functions.
        let mut roots = Vec::new();
        for c in &chosen {
            let found = b.symbols.iter().find(|s| {
                stable_name(&String::from_utf8_lossy(s.name.as_slice())) == stable_name(&c.name)
                    && s.section.is_some()
                    && s.st_type() == elf::STT_FUNC
            });
            match found.and_then(|s| s.section) {
                Some(sec) => roots.push(sec),
                None => {
                    return Err(EmitError::Missing {
                        source_name,
                        name: c.name.clone(),
                    });
                }
            }
        }
        let relocations_of: HashMap<usize, SectionId> = b
            .sections
            .iter()
            .filter(|s| matches!(s.data, SectionData::Relocation(_)))
            .filter_map(|s| s.sh_info_section.map(|target| (target.index(), s.id())))
            .collect();
        let mut kept: BTreeSet<usize> = BTreeSet::new();
        // The personality pointers the unwind tables keep (`DW.ref.*`):
        // their reference is bound like any other.
        roots.extend(
            b.sections
                .iter()
                .filter(|s| s.name.as_slice().windows(7).any(|w| w == b"DW.ref."))
                .map(|s| s.id()),
        );
        let mut work: Vec<SectionId> = roots.clone();
        // (relocation section, index) → what to do with it.
        let mut actions: Vec<(SectionId, usize, Dest, i64, u32, String)> = Vec::new();
        while let Some(sec) = work.pop() {
            if !kept.insert(sec.index()) {
                continue;
            }
            let Some(&rel) = relocations_of.get(&sec.index()) else {
                continue;
            };
            let SectionData::Relocation(list) = &b.sections.get(rel).data else {
                continue;
            };
            for (i, r) in list.iter().enumerate() {
                let Some(sym) = r.symbol else { continue };
                let (dest, addend, name) = dest_of(sym, r.r_addend, r.r_type);
                match &dest {
                    Dest::Inside(Some(target)) => {
                        work.push(*target);
                        if let Some(n) = &name
                            && !chosen_names.contains(stable_name(n))
                            && section_class(*target) == Class::Code
                        {
                            out.carried.insert(format!("{source_name}:{n}"));
                        }
                    }
                    Dest::Binary { .. } | Dest::Refused(_) => {
                        actions.push((rel, i, dest.clone(), addend, r.r_type, name.unwrap_or_default()));
                    }
                    Dest::Inside(None) | Dest::Outside => {}
                }
            }
        }
        // Sections left out that refer to the binary: the linker must drop
        // them, since their references are not bound. (Others may stay,
        // e.g. a personality pointer the unwind tables keep.)
        let unbound: HashSet<usize> = b
            .sections
            .iter()
            .filter(|s| !kept.contains(&s.id().index()) && s.is_alloc())
            .filter(|s| {
                relocations_of
                    .get(&s.id().index())
                    .is_some_and(|&rel| match &b.sections.get(rel).data {
                        SectionData::Relocation(list) => list.iter().any(|r| {
                            r.symbol.is_some_and(|sym| {
                                matches!(
                                    dest_of(sym, r.r_addend, r.r_type).0,
                                    Dest::Binary { .. } | Dest::Refused(_)
                                )
                            })
                        }),
                        _ => false,
                    })
            })
            .map(|s| s.id().index())
            .collect();
        // Apply the actions.
        let locals: HashSet<String> = b
            .symbols
            .iter()
            .filter(|s| s.st_bind() == elf::STB_LOCAL)
            .map(|s| String::from_utf8_lossy(s.name.as_slice()).into_owned())
            .collect();
        let global_of = |name: &str| !locals.contains(name);
        let mut slots: BTreeMap<String, SymbolId> = BTreeMap::new();
        let mut slot_section: Option<SectionId> = None;
        let mut site_count = 0usize;
        for (rel, i, dest, addend, r_type, name) in actions {
            let (query, thread_local) = match dest {
                Dest::Binary { query, thread_local } => (query, thread_local),
                Dest::Refused(reason) => {
                    out.refusals.push(Refusal {
                        symbol: crate::binary::query(unit.source.as_deref(), &name, global_of(&name)),
                        reason,
                    });
                    continue;
                }
                _ => continue,
            };
            if thread_local || is_tls(r_type) {
                out.refusals.push(Refusal {
                    symbol: crate::binary::query(unit.source.as_deref(), &name, global_of(&name)),
                    reason: "the fixed code uses a thread-local of the program; a patch cannot reach another image's thread-locals".into(),
                });
                continue;
            }
            let target_section = b.sections.get(rel).sh_info_section;
            let SectionData::Relocation(list) = &b.sections.get(rel).data else {
                continue;
            };
            let r_offset = list[i].r_offset;
            let mut site = |b: &mut Builder<'_>| -> String {
                site_count += 1;
                let name = format!("{EXPORT_PREFIX}site_{}_{site_count}", unit.index);
                let s = b.symbols.add();
                s.name = name.clone().into_bytes().into();
                s.section = target_section;
                s.st_value = r_offset;
                s.st_size = 8;
                s.set_st_info(elf::STB_GLOBAL, elf::STT_OBJECT);
                s.st_other = elf::STV_DEFAULT;
                name
            };
            match r_type {
                elf::R_X86_64_GOTOFF64 | elf::R_X86_64_PLTOFF64 => {
                    let site = site(&mut b);
                    out.records.push(BoundRecord::GotOffset {
                        target: query.clone(),
                        site,
                        addend,
                    });
                    out.bindings.insert(Binding { symbol: query, how: "rel64" });
                    set_relocation(&mut b, rel, i, None, elf::R_X86_64_NONE, 0);
                }
                elf::R_X86_64_64 => {
                    let site = site(&mut b);
                    out.records.push(BoundRecord::Address {
                        target: query.clone(),
                        pointer: site,
                        addend,
                    });
                    out.bindings.insert(Binding { symbol: query, how: "ref" });
                    set_relocation(&mut b, rel, i, None, elf::R_X86_64_NONE, 0);
                }
                elf::R_X86_64_GOT64
                | elf::R_X86_64_GOTPCREL
                | elf::R_X86_64_GOTPCRELX
                | elf::R_X86_64_REX_GOTPCRELX
                | elf::R_X86_64_GOTPCREL64 => {
                    let slot = match slots.get(&query) {
                        Some(&id) => id,
                        None => {
                            let section = *slot_section.get_or_insert_with(|| {
                                let s = b.sections.add();
                                s.name = format!(".data.{EXPORT_PREFIX}slots").into_bytes().into();
                                s.sh_type = elf::SHT_PROGBITS;
                                s.sh_flags = u64::from(elf::SHF_ALLOC | elf::SHF_WRITE);
                                s.sh_addralign = 8;
                                s.data = SectionData::Data(Vec::new().into());
                                s.id()
                            });
                            let SectionData::Data(data) = &mut b.sections.get_mut(section).data else { continue };
                            let at = data.len() as u64;
                            data.to_mut().extend_from_slice(&[0; 8]);
                            let slot_name = format!("{EXPORT_PREFIX}slot_{}_{}", unit.index, slots.len());
                            let s = b.symbols.add();
                            s.name = slot_name.clone().into_bytes().into();
                            s.section = Some(section);
                            s.st_value = at;
                            s.st_size = 8;
                            s.set_st_info(elf::STB_GLOBAL, elf::STT_OBJECT);
                            s.st_other = elf::STV_DEFAULT;
                            out.records.push(BoundRecord::Address {
                                target: query.clone(),
                                pointer: slot_name.clone(),
                                addend: 0,
                            });
                            out.bindings.insert(Binding {
                                symbol: query.clone(),
                                how: "slot",
                            });
                            let id = s.id();
                            slots.insert(query.clone(), id);
                            id
                        }
                    };
                    if addend != 0 && r_type == elf::R_X86_64_GOT64 {
                        out.refusals.push(Refusal {
                            symbol: crate::binary::query(unit.source.as_deref(), &name, global_of(&name)),
                            reason: format!("a GOT reference with addend {addend}"),
                        });
                        continue;
                    }
                    // The slot holds &S: a GOT load from it is a load of &S.
                    let new_type = if r_type == elf::R_X86_64_GOT64 {
                        elf::R_X86_64_GOTOFF64
                    } else if r_type == elf::R_X86_64_GOTPCREL64 {
                        elf::R_X86_64_PC64
                    } else {
                        elf::R_X86_64_PC32
                    };
                    let kept_addend = if r_type == elf::R_X86_64_GOT64 { 0 } else { addend };
                    set_relocation(&mut b, rel, i, Some(slot), new_type, kept_addend);
                }
                other => out.refusals.push(Refusal {
                    symbol: crate::binary::query(unit.source.as_deref(), &name, global_of(&name)),
                    reason: format!(
                        "the fixed code refers to it with relocation type {other}, which cannot reach the running binary from a patch library (was the unit compiled with -mcmodel=large?)"
                    ),
                }),
            }
        }
        // The replaced functions: exported under their replacement names.
        for c in chosen.iter().filter(|c| c.replaced) {
            let new_name = replacement_name(c.unit, &c.name, c.global);
            for s in b.symbols.iter_mut() {
                if stable_name(&String::from_utf8_lossy(s.name.as_slice())) == stable_name(&c.name)
                    && s.section.is_some()
                    && s.st_type() == elf::STT_FUNC
                {
                    s.name = new_name.clone().into_bytes().into();
                    s.set_st_info(elf::STB_GLOBAL, elf::STT_FUNC);
                    s.st_other = elf::STV_DEFAULT;
                }
            }
        }
        // Calls to another unit's replaced global functions.
        for s in b.symbols.iter_mut() {
            if s.section.is_none()
                && let Some(new) = global_renames.get(String::from_utf8_lossy(s.name.as_slice()).as_ref())
            {
                s.name = new.clone().into_bytes().into();
            }
        }
        // Nothing of the program's start-up runs again inside the target.
        let startup: Vec<SectionId> = b
            .sections
            .iter()
            .filter(|s| {
                let n = s.name.as_slice();
                [
                    &b".init_array"[..],
                    b".fini_array",
                    b".ctors",
                    b".dtors",
                    b".preinit_array",
                    // It would keep every function it lists.
                    b"__patchable_function_entries",
                ]
                .iter()
                .any(|p| n.starts_with(p))
            })
            .map(|s| s.id())
            .collect();
        for id in startup {
            b.sections.get_mut(id).delete = true;
            if let Some(&rel) = relocations_of.get(&id.index()) {
                b.sections.get_mut(rel).delete = true;
            }
        }
        b.delete_orphans();
        let dropped: BTreeSet<String> = b
            .sections
            .iter()
            .filter(|s| !s.delete && unbound.contains(&s.id().index()))
            .filter(|s| match &s.data {
                SectionData::Data(d) => !d.is_empty(),
                SectionData::UninitializedData(n) => *n > 0,
                _ => false,
            })
            .filter(|s| {
                !s.name.as_slice().starts_with(b".eh_frame")
                    && !s.name.as_slice().starts_with(b".data.__hotpatch")
            })
            .map(|s| String::from_utf8_lossy(s.name.as_slice()).into_owned())
            .collect();
        out.dropped.push(dropped);
        let mut bytes = Vec::new();
        b.write(&mut bytes).map_err(|e| err(e.to_string()))?;
        out.objects.push(bytes);
    }
    Ok(out)
}

/// LLVM's address-significance table (clang's default), which the object
/// rewriter does not read.
const SHT_LLVM_ADDRSIG: u32 = 0x6fff_4c03;

/// The object with its COMDAT groups dissolved (C++ inline functions,
/// templates) and clang's address-significance table marked for removal:
/// a patch needs neither (its copies of inline code are its own, never
/// merged with another object's). Both become plain data, deleted by name
/// once read.
pub fn ungrouped(object: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = object.to_vec();
    let u16_at = |b: &[u8], at: usize| b.get(at..at + 2).map(|x| u16::from_le_bytes([x[0], x[1]]));
    let u64_at = |b: &[u8], at: usize| {
        b.get(at..at + 8)
            .and_then(|x| <[u8; 8]>::try_from(x).ok())
            .map(u64::from_le_bytes)
    };
    if out.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return Err("not a little-endian ELF64 object".into());
    }
    let shoff = u64_at(&out, 0x28).ok_or("truncated header")? as usize;
    let shentsize = usize::from(u16_at(&out, 0x3a).ok_or("truncated header")?);
    let shnum = usize::from(u16_at(&out, 0x3c).ok_or("truncated header")?);
    if shentsize < 64 {
        return Err(format!("section header size {shentsize}"));
    }
    for i in 0..shnum {
        let at = shoff + i * shentsize;
        let header = out
            .get_mut(at..at + 64)
            .ok_or_else(|| format!("section header {i} is past the end"))?;
        let sh_type = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if sh_type == elf::SHT_GROUP || sh_type == SHT_LLVM_ADDRSIG {
            header[4..8].copy_from_slice(&elf::SHT_PROGBITS.to_le_bytes());
        }
        let mut flags = [0u8; 8];
        flags.copy_from_slice(&header[8..16]);
        let flags = u64::from_le_bytes(flags) & !u64::from(elf::SHF_GROUP);
        header[8..16].copy_from_slice(&flags.to_le_bytes());
    }
    Ok(out)
}

fn is_tls(r_type: u32) -> bool {
    matches!(
        r_type,
        elf::R_X86_64_TLSGD
            | elf::R_X86_64_TLSLD
            | elf::R_X86_64_DTPOFF32
            | elf::R_X86_64_DTPOFF64
            | elf::R_X86_64_GOTTPOFF
            | elf::R_X86_64_TPOFF32
            | elf::R_X86_64_TPOFF64
            | elf::R_X86_64_GOTPC32_TLSDESC
            | elf::R_X86_64_TLSDESC_CALL
    )
}

fn set_relocation(
    b: &mut Builder<'_>,
    rel: SectionId,
    i: usize,
    symbol: Option<SymbolId>,
    r_type: u32,
    addend: i64,
) {
    if let SectionData::Relocation(list) = &mut b.sections.get_mut(rel).data
        && let Some(r) = list.get_mut(i)
    {
        r.symbol = symbol;
        r.r_type = r_type;
        r.r_addend = addend;
    }
}

/// The version script: only the patch's own symbols are exported.
pub fn version_script() -> String {
    format!("{{\n  global: {EXPORT_PREFIX}*;\n  local: *;\n}};\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_render_with_the_gots_distance() {
        let r = BoundRecord::GotOffset {
            target: "a.c:count".into(),
            site: "__hotpatch_site_0_1".into(),
            addend: 8,
        };
        assert_eq!(
            r.render("__hotpatch_fn_f", 0x2000),
            "rel64 a.c:count __hotpatch_site_0_1 -8184 __hotpatch_fn_f"
        );
        let p = BoundRecord::Address {
            target: "stderr".into(),
            pointer: "__hotpatch_slot_0_0".into(),
            addend: 0,
        };
        assert_eq!(p.render("x", 5), "ref stderr __hotpatch_slot_0_0");
    }

    #[test]
    fn replacement_names_are_c_identifiers() {
        assert_eq!(
            replacement_name(3, "parse.part.0", false),
            "__hotpatch_fn_3_parse_part_0"
        );
        assert_eq!(replacement_name(3, "deflate", true), "__hotpatch_fn_deflate");
    }
}
