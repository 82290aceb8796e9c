//! Function symbols from `.symtab` and `.dynsym`, merged by address.

use object::Endianness;
use object::elf;
use object::read::elf::{SectionTable, Sym};
use std::collections::BTreeMap;

type Header = elf::FileHeader64<Endianness>;

/// Symbol binding, as far as patching cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Binding {
    Global,
    Weak,
    Local,
}

/// Which symbol table(s) a name came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SymbolSource {
    Symtab,
    Dynsym,
    Both,
}

/// `STT_FUNC` or `STT_GNU_IFUNC`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FunctionKind {
    Function,
    /// The address is an IFUNC resolver, run once by the dynamic linker;
    /// the implementation it picks is a function of its own.
    IfuncResolver,
}

/// The kind of compiler clone a suffixed name denotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CloneKind {
    /// `foo.part.N`: a partially inlined body.
    Part,
    /// `foo.constprop.N`: a copy specialised on constant arguments.
    Constprop,
    /// `foo.isra.N`: a copy with scalar-replaced arguments.
    Isra,
    /// `foo.cold` / `foo.cold.N`: the unlikely half of `foo`, entered by jumps.
    Cold,
    /// `foo.lto_priv.N`: a local symbol renamed by LTO.
    LtoPriv,
    /// `foo.localalias`: a local alias of a global function.
    LocalAlias,
    /// `foo.specialized.N` and other numbered copies.
    Specialized,
}

/// One name of a function.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SymbolName {
    /// The name as it appears in the symbol table.
    pub name: String,
    /// The demangled name, for Rust (and C++) symbols.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub demangled: Option<String>,
    pub binding: Binding,
    pub source: SymbolSource,
    /// For compiler clones: the function it is a clone of, and how.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clone_of: Option<(String, CloneKind)>,
}

impl SymbolName {
    /// The name for people: demangled where possible.
    pub fn display(&self) -> &str {
        self.demangled.as_deref().unwrap_or(&self.name)
    }
}

/// A function: one entry address and every name that points at it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Function {
    pub address: u64,
    /// `st_size`; 0 when the symbol does not say (hand-written assembly).
    pub size: u64,
    pub kind: FunctionKind,
    /// All names, the preferred one first (see [`Function::name`]).
    pub names: Vec<SymbolName>,
}

impl Function {
    /// The preferred name: global before weak before local, then the one
    /// with the fewest leading underscores, then the shortest.
    pub fn name(&self) -> &SymbolName {
        &self.names[0]
    }

    /// Whether every name of this function is a `.cold` split: code that is
    /// jumped to from its parent, never called.
    pub fn is_cold_part(&self) -> bool {
        self.names
            .iter()
            .all(|n| matches!(n.clone_of, Some((_, CloneKind::Cold))))
    }

    /// Whether `name` (raw or demangled, with or without the hash suffix of
    /// a Rust symbol) is one of this function's names.
    pub fn has_name(&self, name: &str) -> bool {
        self.names
            .iter()
            .any(|n| n.name == name || n.demangled.as_deref() == Some(name))
    }
}

/// Recognise a compiler clone suffix: `foo.constprop.0` → (`foo`, Constprop).
pub fn clone_of(name: &str) -> Option<(String, CloneKind)> {
    // Find the first suffix that is a known clone marker; GCC stacks them
    // (`foo.isra.0.cold`), and the base is everything before the first.
    let (base, rest) = name.split_once('.')?;
    if base.is_empty() {
        return None;
    }
    let mut kind = None;
    for part in rest.split('.') {
        let this = match part {
            "part" => CloneKind::Part,
            "constprop" => CloneKind::Constprop,
            "isra" => CloneKind::Isra,
            "cold" => CloneKind::Cold,
            "lto_priv" => CloneKind::LtoPriv,
            "localalias" => CloneKind::LocalAlias,
            "specialized" => CloneKind::Specialized,
            p if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => continue,
            _ => return None,
        };
        // `.cold` wins: a cold split of a clone is still only a split.
        if kind != Some(CloneKind::Cold) {
            kind = Some(this);
        }
    }
    kind.map(|k| (base.to_string(), k))
}

/// Demangle Rust (v0 and legacy) names; `None` for plain C names.
pub fn demangle(name: &str) -> Option<String> {
    let d = rustc_demangle::try_demangle(name).ok()?;
    Some(format!("{d:#}"))
}

struct RawFunction {
    address: u64,
    size: u64,
    ifunc: bool,
    name: String,
    binding: Binding,
    dynamic: bool,
}

/// Read defined `STT_FUNC`/`STT_GNU_IFUNC` symbols of both tables and merge
/// them: one [`Function`] per address, every distinct name kept once.
/// Only symbols whose address `keep` accepts are read (their names are
/// read and demangled; the others' are not).
pub(super) fn read_functions<'d, R: object::ReadRef<'d>>(
    endian: Endianness,
    data: R,
    sections: &SectionTable<'d, Header, R>,
    keep: impl Fn(u64) -> bool,
) -> Result<Vec<Function>, String> {
    let mut raw = Vec::new();
    for (sh_type, dynamic) in [(elf::SHT_SYMTAB, false), (elf::SHT_DYNSYM, true)] {
        let table = sections
            .symbols(endian, data, sh_type)
            .map_err(|e| format!("{}: {}", if dynamic { ".dynsym" } else { ".symtab" }, e))?;
        // The whole string table at once where it can be read (one read
        // for a file read in pieces, not one per name).
        let strings: Option<&[u8]> = sections
            .section(table.string_section())
            .ok()
            .and_then(|s| object::read::elf::SectionHeader::data(s, endian, data).ok());
        for sym in table.iter() {
            let ifunc = match sym.st_type() {
                elf::STT_FUNC => false,
                elf::STT_GNU_IFUNC => true,
                _ => continue,
            };
            if sym.st_shndx(endian) == elf::SHN_UNDEF
                || sym.st_value(endian) == 0
                || !keep(sym.st_value(endian))
            {
                continue;
            }
            let binding = match sym.st_bind() {
                elf::STB_GLOBAL | elf::STB_GNU_UNIQUE => Binding::Global,
                elf::STB_WEAK => Binding::Weak,
                _ => Binding::Local,
            };
            let name = match strings {
                Some(strings) => {
                    let at = sym.st_name(endian) as usize;
                    match strings
                        .get(at..)
                        .and_then(|rest| Some(&rest[..memchr::memchr(0, rest)?]))
                    {
                        Some(n) => n,
                        None => continue,
                    }
                }
                None => match table.symbol_name(endian, sym) {
                    Ok(n) => n,
                    Err(_) => continue,
                },
            };
            if name.is_empty() {
                continue;
            }
            raw.push(RawFunction {
                address: sym.st_value(endian),
                size: sym.st_size(endian),
                ifunc,
                name: String::from_utf8_lossy(name).into_owned(),
                binding,
                dynamic,
            });
        }
    }

    let mut by_address: BTreeMap<u64, Function> = BTreeMap::new();
    for r in raw {
        let f = by_address.entry(r.address).or_insert_with(|| Function {
            address: r.address,
            size: 0,
            kind: FunctionKind::IfuncResolver,
            names: Vec::new(),
        });
        f.size = f.size.max(r.size);
        if !r.ifunc {
            // A plain FUNC name at the address means it is ordinary code.
            f.kind = FunctionKind::Function;
        }
        match f.names.iter_mut().find(|n| n.name == r.name) {
            Some(n) => {
                let other = if r.dynamic {
                    SymbolSource::Dynsym
                } else {
                    SymbolSource::Symtab
                };
                if n.source != other {
                    n.source = SymbolSource::Both;
                }
                n.binding = n.binding.min(r.binding);
            }
            None => f.names.push(SymbolName {
                demangled: demangle(&r.name),
                clone_of: clone_of(&r.name),
                name: r.name,
                binding: r.binding,
                source: if r.dynamic {
                    SymbolSource::Dynsym
                } else {
                    SymbolSource::Symtab
                },
            }),
        }
    }
    let mut functions: Vec<Function> = by_address.into_values().collect();
    for f in &mut functions {
        f.names.sort_by(|a, b| {
            let underscores = |n: &SymbolName| n.name.bytes().take_while(|&c| c == b'_').count();
            (
                a.binding,
                a.clone_of.is_some(),
                underscores(a),
                a.name.len(),
                &a.name,
            )
                .cmp(&(
                    b.binding,
                    b.clone_of.is_some(),
                    underscores(b),
                    b.name.len(),
                    &b.name,
                ))
        });
    }
    Ok(functions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clone_suffixes() {
        assert_eq!(clone_of("foo.part.0"), Some(("foo".into(), CloneKind::Part)));
        assert_eq!(
            clone_of("foo.constprop.12"),
            Some(("foo".into(), CloneKind::Constprop))
        );
        assert_eq!(clone_of("foo.cold"), Some(("foo".into(), CloneKind::Cold)));
        assert_eq!(clone_of("foo.isra.0.cold"), Some(("foo".into(), CloneKind::Cold)));
        assert_eq!(
            clone_of("foo.lto_priv.0"),
            Some(("foo".into(), CloneKind::LtoPriv))
        );
        assert_eq!(clone_of("foo"), None);
        assert_eq!(clone_of(".L.str"), None);
        assert_eq!(clone_of("foo.bar"), None);
        assert_eq!(clone_of("foo.0"), None);
    }

    #[test]
    fn rust_names_demangle() {
        assert_eq!(demangle("_RNvCs6GmmlP4bgsG_1r3add").as_deref(), Some("r::add"));
        assert_eq!(
            demangle("_ZN4core3fmt5write17h0123456789abcdefE").as_deref(),
            Some("core::fmt::write")
        );
        assert_eq!(demangle("memcpy"), None);
    }
}
