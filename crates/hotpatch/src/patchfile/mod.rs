//! Patch libraries: what a patch replaces, what it needs, what it is for.
//!
//! A patch describes itself in a `.hotpatch` section of strings (see
//! `include/hotpatch.h`), one record per string:
//!
//! ```text
//! hotpatch-v1 target IMAGE [BUILD-ID]
//! hotpatch-v1 replace TARGET-FUNCTION REPLACEMENT
//! hotpatch-v1 ref TARGET-SYMBOL POINTER-VARIABLE
//! hotpatch-v1 orig TARGET-FUNCTION POINTER-VARIABLE
//! ```
//!
//! A plain `.so` without the section gets the same records from the command
//! line. [`PatchSpec`] holds the records checked against the patch's own
//! exported symbols; resolving the target names is the planner's job.

pub mod copies;
mod file;
mod record;

pub use file::PatchFile;
pub use record::{Record, RecordError, parse_records};

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
            records.push(Record::Ref { symbol, pointer });
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
    };
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
            Record::Ref { symbol, pointer } => {
                spec.references.push(reference(
                    RefKind::Symbol,
                    symbol,
                    pointer,
                    &exported_of,
                    &invalid,
                )?);
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
    let mut filled = std::collections::HashSet::new();
    for r in &spec.references {
        if !filled.insert(r.pointer.as_str()) {
            return Err(invalid(format!("pointer `{}` is filled twice", r.pointer)));
        }
    }
    Ok(spec)
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
    })
}
