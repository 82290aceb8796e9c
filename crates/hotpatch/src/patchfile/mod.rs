//! Patch libraries: what a patch replaces, what it needs, what it is for.
//!
//! A patch describes itself in a `.hotpatch` section of strings (see
//! `include/hotpatch.h`), one record per string:
//!
//! ```text
//! hotpatch-v1 target IMAGE [BUILD-ID]
//! hotpatch-v1 replace TARGET-FUNCTION REPLACEMENT
//! hotpatch-v1 ref TARGET-SYMBOL POINTER-VARIABLE [ADDEND]
//! hotpatch-v1 orig TARGET-FUNCTION POINTER-VARIABLE
//! hotpatch-v1 rel64 TARGET-SYMBOL SITE ADDEND BASE
//! ```
//!
//! Fields are separated by whitespace. A TARGET-SYMBOL is looked up in the
//! target image as for every record: a name from `.symtab` or `.dynsym`
//! (static functions and variables included), `file.c:name`, or
//! `0xADDRESS` (the address in the file, before relocation).
//!
//! `ref` fills POINTER-VARIABLE, an exported variable (`STT_OBJECT`) of
//! the patch of 8 bytes, with the address of TARGET-SYMBOL in the
//! process plus ADDEND (0 if absent), before anything of the patch runs.
//!
//! `rel64` is written by tools (`hotpatch build`), for code compiled with
//! `-mcmodel=large` whose 64-bit `S@GOTOFF` / `S@PLTOFF` constants name a
//! symbol S of the target: the tool strips the relocation, leaves the 8
//! bytes zero, exports a symbol at them, and emits this record. Before
//! anything of the patch runs, the engine writes the 8 bytes at SITE, as a
//! little-endian 64-bit value computed with wrapping arithmetic:
//!
//! ```text
//! address(TARGET-SYMBOL in the process) + ADDEND - address(BASE in the process)
//! ```
//!
//! - ADDEND: a decimal or `0x` hexadecimal number, optionally preceded by
//!   `-` or `+` (`0`, `-4`, `0x10`, `-0x10`), within the range of an i64.
//! - SITE: a symbol of the patch's dynamic symbol table (`.dynsym`):
//!   defined (not `SHN_UNDEF`, not `SHN_ABS`), binding `STB_GLOBAL` or
//!   `STB_WEAK`, visibility default or protected (what the linker puts in
//!   `.dynsym`), in its default version, defined once; type `STT_OBJECT`
//!   or `STT_NOTYPE`; size 8 or 0 (0: a plain label, as
//!   `objcopy --add-symbol NAME=.text:OFFSET,global,object` makes); and
//!   its 8 bytes lie within one `PT_LOAD` segment of the patch. It may be
//!   in code (the engine writes through `/proc/PID/mem`, which a read-only
//!   mapping does not stop). The 8 bytes must be zero in the loaded patch:
//!   anything else refuses the apply, naming the site, and nothing of the
//!   patch is filled.
//! - BASE: a symbol of the patch's `.dynsym`, with the same rules as SITE
//!   except that its type may be `STT_FUNC`, `STT_OBJECT` or `STT_NOTYPE`
//!   and its size does not matter. For `S@GOTOFF` and `S@PLTOFF` it is
//!   the patch's GOT: GNU ld makes an exported one with
//!   `-Wl,--defsym,__hotpatch_got=ADDR(.got.plt)`, an `STT_NOTYPE` at the
//!   address of `_GLOBAL_OFFSET_TABLE_` (binutils 2.40; a `--defsym` equal
//!   to `_GLOBAL_OFFSET_TABLE_` itself comes out local, not in `.dynsym`,
//!   and is refused here).
//!
//! No two records fill overlapping bytes (a `ref`/`orig` pointer or a
//! `rel64` site): a patch that does is refused, naming both.
//!
//! A plain `.so` without the section gets the same records from the command
//! line. [`PatchSpec`] holds the records checked against the patch's own
//! exported symbols; resolving the target names is the planner's job.

pub mod copies;
mod file;
mod record;

pub use file::PatchFile;
pub use record::{Record, RecordError, parse_addend, parse_records};

use crate::image::{self, Image, ImageError, SymbolKind};
use std::path::{Path, PathBuf};

/// The section a patch describes itself in.
pub const SECTION: &str = ".hotpatch";

/// One function replacement.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Replacement {
    /// The target function, as the author named it.
    pub target: String,
    /// The patch's exported function that replaces it.
    pub replacement: String,
    /// Its address in the patch file (before loading).
    pub replacement_address: u64,
}

/// Whether a pointer receives a symbol's address or the original code's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RefKind {
    /// The symbol's address: a variable, or a function (which, if
    /// patched, runs the newest replacement).
    Symbol,
    /// The original code of a function, callable while it is patched.
    Original,
}

/// A pointer variable of the patch to fill before the patch runs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Reference {
    pub kind: RefKind,
    /// The target symbol, as the author named it.
    pub symbol: String,
    /// The patch's exported 8-byte variable that receives the address.
    pub pointer: String,
    pub pointer_address: u64,
    /// Added to the address (`ref` only; 0 for `orig`).
    pub addend: i64,
}

/// 8 zero bytes of the patch (code or data) to fill with a target
/// symbol's address relative to a symbol of the patch: a `rel64` record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rel64 {
    /// The target symbol, as the record named it.
    pub symbol: String,
    /// The patch's exported symbol at the 8 bytes.
    pub site: String,
    pub site_address: u64,
    pub addend: i64,
    /// The patch's exported symbol whose address is subtracted.
    pub base: String,
}

impl Rel64 {
    /// What the site receives: `symbol + addend - base`, wrapping.
    pub fn value(symbol: u64, addend: i64, base: u64) -> u64 {
        symbol.wrapping_add_signed(addend).wrapping_sub(base)
    }
}

/// The image a patch was made for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TargetImage {
    /// A soname, path, or file name.
    pub image: String,
    /// GNU build-id in hex; `None` means any build.
    pub build_id: Option<String>,
}

/// A validated patch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PatchSpec {
    pub path: PathBuf,
    pub build_id: Option<String>,
    /// `None`: the target process's main executable.
    pub target: Option<TargetImage>,
    pub replacements: Vec<Replacement>,
    pub references: Vec<Reference>,
    /// `rel64` records.
    pub rel64: Vec<Rel64>,
}

/// What is wrong with a patch. Every variant names the patch file.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{}: not a patch: no {SECTION} section (build it with include/hotpatch.h, or give --replace TARGET=REPLACEMENT)", path.display())]
    NotAPatch { path: PathBuf },
    #[error("{}: {SECTION} section: {error}", path.display())]
    Record { path: PathBuf, error: RecordError },
    #[error("{}: {what}", path.display())]
    Invalid { path: PathBuf, what: String },
}

/// Records given on the command line, for a `.so` without a section.
#[derive(Debug, Clone, Default)]
pub struct CommandLineRecords {
    /// `TARGET=REPLACEMENT`.
    pub replace: Vec<String>,
    /// `SYMBOL=POINTER`.
    pub refs: Vec<String>,
    /// `FUNCTION=POINTER`.
    pub origs: Vec<String>,
}

impl CommandLineRecords {
    fn to_records(&self, path: &Path) -> Result<Vec<Record>, PatchError> {
        let split = |s: &String, what: &str| {
            s.split_once('=')
                .filter(|(a, b)| !a.is_empty() && !b.is_empty())
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| PatchError::Invalid {
                    path: path.to_path_buf(),
                    what: format!("`{s}`: expected {what}"),
                })
        };
        let mut records = Vec::new();
        for s in &self.replace {
            let (target, replacement) = split(s, "TARGET=REPLACEMENT")?;
            records.push(Record::Replace { target, replacement });
        }
        for s in &self.refs {
            let (symbol, pointer) = split(s, "SYMBOL=POINTER")?;
            records.push(Record::Ref {
                symbol,
                pointer,
                addend: 0,
            });
        }
        for s in &self.origs {
            let (symbol, pointer) = split(s, "FUNCTION=POINTER")?;
            records.push(Record::Orig { symbol, pointer });
        }
        Ok(records)
    }

    pub fn is_empty(&self) -> bool {
        self.replace.is_empty() && self.refs.is_empty() && self.origs.is_empty()
    }
}

impl PatchSpec {
    /// Read the patch at `path`: its section, plus any command-line records.
    pub fn read(path: &Path, extra: &CommandLineRecords) -> Result<PatchSpec, PatchError> {
        PatchSpec::from_file(&PatchFile::read(path)?, extra)
    }

    /// The spec of a patch file already read.
    pub fn from_file(file: &PatchFile, extra: &CommandLineRecords) -> Result<PatchSpec, PatchError> {
        let image = Image::parse(file.path(), file.bytes().to_vec())?;
        PatchSpec::from_image(&image, extra)
    }

    /// Build the spec from a parsed patch image.
    pub fn from_image(image: &Image, extra: &CommandLineRecords) -> Result<PatchSpec, PatchError> {
        let path = image.path().to_path_buf();
        let mut records = match image.section_data(SECTION) {
            Some(data) => parse_records(data).map_err(|error| PatchError::Record {
                path: path.clone(),
                error,
            })?,
            None if extra.is_empty() => return Err(PatchError::NotAPatch { path }),
            None => Vec::new(),
        };
        records.extend(extra.to_records(&path)?);
        validate(image, records)
    }
}

fn validate(image: &Image, records: Vec<Record>) -> Result<PatchSpec, PatchError> {
    let path = image.path().to_path_buf();
    let invalid = |what: String| PatchError::Invalid {
        path: path.clone(),
        what,
    };
    // The patch's own exported symbols: only those can be found with dlsym.
    let exported: Vec<image::SymbolMatch> = image::lookup::symbols(image)
        .into_iter()
        .filter(|s| s.global)
        .collect();
    // The first of each name and kind, as a search in table order finds it.
    let mut by_name: std::collections::HashMap<(&str, SymbolKind), &image::SymbolMatch> =
        std::collections::HashMap::with_capacity(exported.len());
    for s in &exported {
        by_name.entry((s.name.as_str(), s.kind)).or_insert(s);
    }
    let exported_of = |name: &str, kind: SymbolKind| by_name.get(&(name, kind)).copied();
    let mut replaced: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut spec = PatchSpec {
        path: path.clone(),
        build_id: image.build_id_hex(),
        target: None,
        replacements: Vec::new(),
        references: Vec::new(),
        rel64: Vec::new(),
    };
    // What `dlsym` finds in the patch: sites and bases must be there.
    let dynamic = image::DynSymbols::parse(image.data())
        .map_err(|what| invalid(format!("its dynamic symbol table cannot be read ({what})")));
    for record in records {
        match record {
            Record::Target {
                image: name,
                build_id,
            } => {
                if spec.target.as_ref().is_some_and(|t| t.image != name) {
                    return Err(invalid(format!(
                        "two target images ({} and {name}); one patch patches one image",
                        spec.target.as_ref().map(|t| t.image.as_str()).unwrap_or_default()
                    )));
                }
                spec.target = Some(TargetImage {
                    image: name,
                    build_id,
                });
            }
            Record::Replace { target, replacement } => {
                let Some(sym) = exported_of(&replacement, SymbolKind::Function) else {
                    return Err(invalid(format!(
                        "replacement `{replacement}` (for `{target}`) is not an exported function of the patch"
                    )));
                };
                if !replaced.insert(target.clone()) {
                    return Err(invalid(format!("`{target}` is replaced twice")));
                }
                spec.replacements.push(Replacement {
                    target,
                    replacement,
                    replacement_address: sym.address,
                });
            }
            Record::Ref {
                symbol,
                pointer,
                addend,
            } => {
                let mut r = reference(RefKind::Symbol, symbol, pointer, &exported_of, &invalid)?;
                r.addend = addend;
                spec.references.push(r);
            }
            Record::Rel64 {
                symbol,
                site,
                addend,
                base,
            } => {
                let dynamic = dynamic.as_ref().map_err(|e| invalid(e.to_string()))?;
                let site_address = rel64_site(image, dynamic, &site, &symbol).map_err(&invalid)?;
                rel64_base(dynamic, &base, &symbol).map_err(&invalid)?;
                spec.rel64.push(Rel64 {
                    symbol,
                    site,
                    site_address,
                    addend,
                    base,
                });
            }
            Record::Orig { symbol, pointer } => {
                spec.references.push(reference(
                    RefKind::Original,
                    symbol,
                    pointer,
                    &exported_of,
                    &invalid,
                )?);
            }
        }
    }
    if spec.replacements.is_empty() {
        return Err(invalid("the patch replaces no function".to_string()));
    }
    if let Some((a, b)) = filled_twice(&spec) {
        return Err(invalid(format!(
            "{a} and {b} fill the same bytes; each 8 bytes are filled by one record"
        )));
    }
    Ok(spec)
}

/// Two records whose 8 bytes overlap, described for a message.
fn filled_twice(spec: &PatchSpec) -> Option<(String, String)> {
    let mut fills: Vec<(u64, String)> = spec
        .references
        .iter()
        .map(|r| {
            let kind = match r.kind {
                RefKind::Symbol => "ref",
                RefKind::Original => "orig",
            };
            (
                r.pointer_address,
                format!("`{}` (`{kind} {}`)", r.pointer, r.symbol),
            )
        })
        .chain(
            spec.rel64
                .iter()
                .map(|r| (r.site_address, format!("`{}` (`rel64 {}`)", r.site, r.symbol))),
        )
        .collect();
    fills.sort_by_key(|(address, _)| *address);
    fills
        .windows(2)
        .find(|w| w[1].0 < w[0].0.saturating_add(8))
        .map(|w| (w[0].1.clone(), w[1].1.clone()))
}

/// A symbol of the patch's `.dynsym` that `dlsym` finds at a relocated
/// address (see the module docs).
fn dynamic_symbol<'d>(
    dynamic: &'d image::DynSymbols,
    name: &str,
    role: &str,
    symbol: &str,
) -> Result<&'d image::DynSym, String> {
    let what = format!("`rel64 {symbol}`: {role} `{name}`");
    match dynamic.lookup(name) {
        None => Err(format!(
            "{what} is not an exported symbol of the patch (not in its .dynsym, or defined more than once)"
        )),
        Some(s) if s.absolute => Err(format!(
            "{what} is an absolute symbol (SHN_ABS): not an address in the patch"
        )),
        Some(s) => Ok(s),
    }
}

/// The file address of a `rel64` site, if `name` is one.
fn rel64_site(image: &Image, dynamic: &image::DynSymbols, name: &str, symbol: &str) -> Result<u64, String> {
    use object::elf;
    let s = dynamic_symbol(dynamic, name, "site", symbol)?;
    let what = format!("`rel64 {symbol}`: site `{name}`");
    if !matches!(s.st_type, elf::STT_OBJECT | elf::STT_NOTYPE) {
        return Err(format!(
            "{what} must be an STT_OBJECT or STT_NOTYPE symbol (it is {})",
            type_name(s.st_type)
        ));
    }
    if s.size != 8 && s.size != 0 {
        return Err(format!(
            "{what} is {} bytes; a site is 8 (or a 0-size label)",
            s.size
        ));
    }
    let inside = image.segments().iter().any(|g| {
        s.value >= g.vaddr
            && s.value
                .checked_add(8)
                .is_some_and(|end| end <= g.vaddr.saturating_add(g.memsz))
    });
    if !inside {
        return Err(format!(
            "{what} at {:#x}: its 8 bytes are not within one loaded segment of the patch",
            s.value
        ));
    }
    Ok(s.value)
}

/// Check that `name` can be a `rel64` base.
fn rel64_base(dynamic: &image::DynSymbols, name: &str, symbol: &str) -> Result<(), String> {
    use object::elf;
    let s = dynamic_symbol(dynamic, name, "base", symbol)?;
    if !matches!(s.st_type, elf::STT_FUNC | elf::STT_OBJECT | elf::STT_NOTYPE) {
        return Err(format!(
            "`rel64 {symbol}`: base `{name}` must be an STT_FUNC, STT_OBJECT or STT_NOTYPE symbol (it is {})",
            type_name(s.st_type)
        ));
    }
    Ok(())
}

fn type_name(st_type: u8) -> String {
    use object::elf;
    match st_type {
        elf::STT_NOTYPE => "STT_NOTYPE".into(),
        elf::STT_OBJECT => "STT_OBJECT".into(),
        elf::STT_FUNC => "STT_FUNC".into(),
        elf::STT_TLS => "STT_TLS".into(),
        elf::STT_GNU_IFUNC => "STT_GNU_IFUNC".into(),
        other => format!("of type {other}"),
    }
}

fn reference<'a>(
    kind: RefKind,
    symbol: String,
    pointer: String,
    exported_of: &impl Fn(&str, SymbolKind) -> Option<&'a image::SymbolMatch>,
    invalid: &impl Fn(String) -> PatchError,
) -> Result<Reference, PatchError> {
    let Some(var) = exported_of(&pointer, SymbolKind::Variable) else {
        return Err(invalid(format!(
            "pointer `{pointer}` (for `{symbol}`) is not an exported variable of the patch"
        )));
    };
    if var.size != 8 {
        return Err(invalid(format!(
            "pointer `{pointer}` is {} bytes; it must be a pointer (8 bytes)",
            var.size
        )));
    }
    Ok(Reference {
        kind,
        symbol,
        pointer,
        pointer_address: var.address,
        addend: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel64_value_is_symbol_plus_addend_minus_base() {
        // A target static at 0x55…, a patch's GOT at 0x7f…: negative.
        let v = Rel64::value(0x5555_5555_8010, 8, 0x7fff_f7fc_3000);
        assert_eq!(v as i64, 0x5555_5555_8018 - 0x7fff_f7fc_3000);
        assert_eq!(Rel64::value(0x1000, -0x10, 0x100), 0xef0);
        // Wrapping both ways, never a panic.
        assert_eq!(Rel64::value(u64::MAX, 1, 0), 0);
        assert_eq!(Rel64::value(0, i64::MIN, 1), (i64::MIN as u64).wrapping_sub(1));
    }
}
