//! Finding a symbol by name — functions and variables, exported or static —
//! the way a patch author names them: `name`, `file.c:name` for a static
//! whose name several files use, or `0xADDRESS` (as in the file).

use super::Image;
use super::symbol::demangle;
use object::Endianness;
use object::elf;
use object::read::elf::{FileHeader, Sym};

/// What a symbol names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SymbolKind {
    Function,
    Variable,
}

/// One defined symbol of an image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SymbolMatch {
    pub name: String,
    pub address: u64,
    pub size: u64,
    pub kind: SymbolKind,
    /// The source file a local symbol belongs to (from `STT_FILE`).
    pub file: Option<String>,
    pub global: bool,
}

impl SymbolMatch {
    /// How to name this symbol unambiguously.
    pub fn qualified(&self) -> String {
        match &self.file {
            Some(f) if !self.global => format!("{f}:{} ({:#x})", self.name, self.address),
            _ => format!("{} ({:#x})", self.name, self.address),
        }
    }
}

/// A name that names nothing, or more than one thing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// `hint` is empty as found; the error path of a caller that can
    /// afford a scan of the image fills it ([`LookupError::with_hint`]).
    #[error("{}: no function or variable named `{}`{hint}", name(image), name(query))]
    NotFound {
        image: String,
        query: String,
        hint: Box<Hint>,
    },
    #[error(
        "{}: `{}` is ambiguous; say which: {}",
        name(image),
        name(query),
        list(candidates)
    )]
    Ambiguous {
        image: String,
        query: String,
        candidates: Vec<String>,
    },
}

use super::suggestion::Hint;
use crate::shorten::name;

impl LookupError {
    /// A [`LookupError::NotFound`] for a name (not an address) with what
    /// it may have meant, from `hint(query)`; other errors as they are.
    pub fn with_hint(self, hint: impl FnOnce(&str) -> Hint) -> LookupError {
        match self {
            LookupError::NotFound {
                image,
                query,
                hint: old,
            } if old.is_empty() && !query.starts_with("0x") => {
                let hint = Box::new(hint(&query));
                LookupError::NotFound { image, query, hint }
            }
            other => other,
        }
    }
}

/// At most 10 candidates, each cut to a readable length.
fn list(candidates: &[String]) -> String {
    let mut shown: Vec<String> = candidates.iter().take(10).map(|c| name(c).into_owned()).collect();
    if candidates.len() > 10 {
        shown.push(format!("and {} more", candidates.len() - 10));
    }
    shown.join(", ")
}

/// Every defined function and variable symbol of `.symtab` and `.dynsym`.
pub fn symbols(image: &Image) -> Vec<SymbolMatch> {
    let data = image.data();
    let Ok(header) = elf::FileHeader64::<Endianness>::parse(data) else {
        return Vec::new();
    };
    let Ok(endian) = header.endian() else {
        return Vec::new();
    };
    let Ok(sections) = header.sections(endian, data) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for sh_type in [elf::SHT_SYMTAB, elf::SHT_DYNSYM] {
        let Ok(table) = sections.symbols(endian, data, sh_type) else {
            continue;
        };
        let mut file: Option<String> = None;
        for sym in table.iter() {
            let name = table
                .symbol_name(endian, sym)
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .unwrap_or_default();
            let kind = match sym.st_type() {
                elf::STT_FILE => {
                    file = (!name.is_empty()).then_some(name);
                    continue;
                }
                elf::STT_FUNC | elf::STT_GNU_IFUNC => SymbolKind::Function,
                elf::STT_OBJECT | elf::STT_TLS => SymbolKind::Variable,
                _ => continue,
            };
            if name.is_empty() || sym.st_shndx(endian) == elf::SHN_UNDEF {
                continue;
            }
            let global = sym.st_bind() != elf::STB_LOCAL;
            out.push(SymbolMatch {
                name,
                address: sym.st_value(endian),
                size: sym.st_size(endian),
                kind,
                file: if global { None } else { file.clone() },
                global,
            });
        }
    }
    out
}

/// Every function and variable symbol of an image, indexed by name, for
/// many lookups (a patch with thousands of functions).
#[derive(Debug, Clone)]
pub struct SymbolIndex {
    image: String,
    symbols: Vec<SymbolMatch>,
    /// Raw and demangled names → indices into `symbols`.
    by_name: std::collections::HashMap<String, Vec<usize>>,
}

impl SymbolIndex {
    pub fn new(image: &Image) -> SymbolIndex {
        let symbols = symbols(image);
        let mut by_name: std::collections::HashMap<String, Vec<usize>> = std::collections::HashMap::new();
        for (i, s) in symbols.iter().enumerate() {
            by_name.entry(s.name.clone()).or_default().push(i);
            if let Some(d) = demangle(&s.name)
                && d != s.name
            {
                by_name.entry(d).or_default().push(i);
            }
        }
        SymbolIndex {
            image: image.path().display().to_string(),
            symbols,
            by_name,
        }
    }

    /// Find the one symbol `query` names (see the module docs). Several
    /// names for one address (aliases, the same symbol in both tables) are
    /// one match.
    pub fn find(&self, query: &str) -> Result<SymbolMatch, LookupError> {
        let q = Query::parse(query);
        let hits: Vec<&SymbolMatch> = match q.address {
            Some(address) => self
                .symbols
                .iter()
                .filter(|s| address.is_some() && Some(s.address) == address)
                .collect(),
            None => self
                .by_name
                .get(q.name)
                .map(|v| v.iter().map(|&i| &self.symbols[i]).collect::<Vec<_>>())
                .unwrap_or_default()
                .into_iter()
                .filter(|s| q.file_matches(s))
                .collect(),
        };
        pick(&self.image, query, hits)
    }
}

/// A query, taken apart: `0xADDRESS`, `file:name` or `name`.
#[derive(Debug, Clone)]
pub(crate) struct Query<'q> {
    /// For `0x…`: the address (`None` inside when it is not hex).
    pub address: Option<Option<u64>>,
    pub file: Option<&'q str>,
    pub name: &'q str,
}

impl<'q> Query<'q> {
    pub fn parse(query: &'q str) -> Query<'q> {
        if let Some(hex) = query.strip_prefix("0x") {
            return Query {
                address: Some(u64::from_str_radix(hex, 16).ok()),
                file: None,
                name: query,
            };
        }
        let (file, name) = match query.rsplit_once(':') {
            // `crate::path::name` is a Rust path, not `file:name`.
            Some((f, n)) if !f.ends_with(':') && !n.is_empty() && !query.contains("::") => (Some(f), n),
            _ => (None, query),
        };
        Query {
            address: None,
            file,
            name,
        }
    }

    pub fn file_matches(&self, s: &SymbolMatch) -> bool {
        match self.file {
            Some(f) => s
                .file
                .as_deref()
                .is_some_and(|sf| sf == f || sf.ends_with(&format!("/{f}"))),
            None => true,
        }
    }

    /// Whether the symbol named `raw` (as read, lossy) answers this
    /// query by its name, raw or demangled.
    pub fn name_matches(&self, raw: &str) -> bool {
        raw == self.name || demangle(raw).is_some_and(|d| d != raw && d == self.name)
    }
}

/// The one match among `hits` (in table order), or why there is none.
pub(crate) fn pick(image: &str, query: &str, hits: Vec<&SymbolMatch>) -> Result<SymbolMatch, LookupError> {
    let mut distinct: Vec<&SymbolMatch> = Vec::new();
    for h in hits {
        if !distinct.iter().any(|d| d.address == h.address) {
            distinct.push(h);
        }
    }
    match distinct.as_slice() {
        [] => Err(LookupError::NotFound {
            image: image.to_string(),
            query: query.to_string(),
            hint: Box::default(),
        }),
        [one] => Ok((*one).clone()),
        many => Err(LookupError::Ambiguous {
            image: image.to_string(),
            query: query.to_string(),
            candidates: many.iter().map(|s| s.qualified()).collect(),
        }),
    }
}

/// Find the one symbol `query` names in `image` (builds a [`SymbolIndex`];
/// for many lookups, build one and reuse it).
pub fn find_symbol(image: &Image, query: &str) -> Result<SymbolMatch, LookupError> {
    SymbolIndex::new(image).find(query)
}
