//! `hotpatch build`: from a source fix to a patch library.
//!
//! ```text
//! hotpatch build --source DIR --diff FIX.diff --build 'make' --binary PATH -o fix.so
//! ```
//!
//! 1. DIR is copied twice into a scratch directory; FIX.diff is applied to
//!    the second copy (`patch -p1`). Objects found in the copies are removed
//!    so that the build compiles everything.
//! 2. The build command runs in each copy with a compiler wrapper first on
//!    its `PATH` ([`wrapper`]): every compile gets function and data sections
//!    and is logged.
//! 3. Every function of the original rebuild is compared with `--binary`'s
//!    code ([`binary::Binary::prove`]); a difference stops the build, since
//!    a patch made from other sources or flags would be wrong.
//! 4. The two builds are compared unit by unit ([`compare`]) and the
//!    functions of the patch chosen ([`select`]), with what must be refused.
//! 5. Each changed unit is compiled once more for the patch and rewritten
//!    ([`emit`]); the objects are linked into the patch library, whose
//!    `.hotpatch` records name the target image and build-id, the
//!    replacements and every bound reference.
//!
//! Runs unprivileged; nothing here touches a process.

pub mod binary;
pub mod compare;
pub mod emit;
pub mod inlining;
pub mod report;
pub mod select;
pub mod tree;
pub mod unit;
pub mod wrapper;

pub use report::Report;

use std::path::{Path, PathBuf};

/// What to build.
#[derive(Debug, Clone)]
pub struct Options {
    pub source: PathBuf,
    pub diff: PathBuf,
    /// A shell command, run in the top of each copy.
    pub build: String,
    pub binary: PathBuf,
    /// Where the caller will write the library (named in the report).
    pub output: PathBuf,
    /// `patch -pN`.
    pub strip: u32,
    /// Keep the scratch directory here instead of a temporary one.
    pub work: Option<PathBuf>,
}

/// Why a build stopped.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Tree(#[from] tree::TreeError),
    #[error("{path}: {what}")]
    Object { path: PathBuf, what: String },
    #[error(
        "the original rebuild is not {binary}: {} (was the binary built from this source with this command? different flags or sources give different code)",
        list(.mismatches)
    )]
    NotTheBinary {
        binary: PathBuf,
        mismatches: Vec<String>,
    },
    #[error("the fix changes no function of the build: nothing to patch{}", .0)]
    NothingChanged(String),
    #[error("the fix cannot be applied as a function swap:\n{}", .0.iter().map(|r| format!("  - {}: {}", r.0, r.1)).collect::<Vec<_>>().join("\n"))]
    Refused(Vec<(String, String)>, Box<Report>),
    #[error(transparent)]
    Emit(#[from] emit::EmitError),
    #[error("linking the patch failed: {0}")]
    Link(String),
}

fn list(items: &[String]) -> String {
    let shown: Vec<&str> = items.iter().take(5).map(String::as_str).collect();
    let more = items.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{}; and {more} more", shown.join("; "))
    } else {
        shown.join("; ")
    }
}

/// A built patch library and its report.
pub struct Built {
    pub report: Report,
    /// The library's bytes, for the caller to write to `Options::output`.
    pub library: Vec<u8>,
}

/// Build the patch library; the report says what it holds and why.
pub fn build(options: &Options) -> Result<Built, BuildError> {
    let image =
        hotpatch::Image::open(&options.binary).map_err(|e| BuildError::Input(format!("--binary: {e}")))?;
    let scratch = tree::Scratch::new(options.work.as_deref())?;
    let builds = scratch.build_both(
        &options.source,
        &options.diff,
        options.strip,
        &options.build,
        &options.binary,
    )?;
    let all_pairs = builds.pairs()?;
    let running = binary::Binary::new(&image);
    let (pairs, orig_units, fixed_units, proof) = units_of_the_binary(&all_pairs, &running, &options.binary)?;
    let changes: Vec<compare::Changes> = orig_units
        .iter()
        .zip(&fixed_units)
        .map(|(o, f)| compare::compare(o, f))
        .collect();
    let unit_pairs: Vec<select::UnitPair<'_>> = orig_units
        .iter()
        .zip(&fixed_units)
        .zip(&changes)
        .map(|((orig, fixed), changes)| select::UnitPair { orig, fixed, changes })
        .collect();
    let selection = select::select(&unit_pairs, &running);
    let mut report = Report::new(options, &image, &pairs, &fixed_units, &changes, &selection, proof);
    explain(&mut report, options, &pairs, &fixed_units, &selection);
    let (layouts, unchecked) = layout_refusals(&pairs, &selection);
    report.refusals.extend(layouts.iter().cloned());
    report.unchecked_layouts = unchecked;
    let all_refusals: Vec<select::Refusal> = selection.refusals.iter().chain(&layouts).cloned().collect();
    if !all_refusals.is_empty() {
        return Err(refused(&all_refusals, report));
    }
    if !selection.chosen.iter().any(|c| c.replaced) {
        let unplaced: Vec<String> = selection.chosen.iter().map(|c| c.name.clone()).collect();
        return Err(BuildError::NothingChanged(if unplaced.is_empty() {
            String::new()
        } else {
            format!(
                " the running binary has (changed: {}, none of them reachable by name)",
                unplaced.join(", ")
            )
        }));
    }
    // The patch compile of every unit with a chosen function.
    let wanted: std::collections::BTreeSet<usize> = selection.chosen.iter().map(|c| c.unit).collect();
    let mut patch_units = Vec::new();
    for &u in &wanted {
        let object = scratch.patch_compile(&pairs[u].fixed, u)?;
        let bytes = std::fs::read(&object).map_err(|e| BuildError::Object {
            path: object.clone(),
            what: e.to_string(),
        })?;
        patch_units.push(emit::PatchUnit {
            index: u,
            source: fixed_units[u].source.clone(),
            object: bytes,
            changes: &changes[u],
        });
    }
    let emitted = emit::emit(&patch_units, &selection, &running)?;
    if !emitted.refusals.is_empty() {
        report.refusals.extend(emitted.refusals.iter().cloned());
        return Err(refused(&emitted.refusals, report));
    }
    let mut fixed_records = vec![format!(
        "target {} {}",
        report.target.image,
        report.target.build_id.clone().unwrap_or_default()
    )];
    for c in selection.chosen.iter().filter(|c| c.replaced) {
        let source = fixed_units[c.unit].source.as_deref();
        let name = changes[c.unit].binary_name(&c.name);
        let target = running
            .resolve(source, &name, c.global)
            .map(|(_, q)| q)
            .unwrap_or_else(|| binary::query(source, &name, c.global));
        fixed_records.push(format!(
            "replace {target} {}",
            emit::replacement_name(c.unit, &c.name, c.global)
        ));
    }
    let render = |base: &str, distance: i64| -> Vec<String> {
        let mut all = fixed_records.clone();
        all.extend(emitted.records.iter().map(|r| r.render(base, distance)));
        all
    };
    // The C compiler that built the units links the patch (`cc` for Rust).
    let compiler = patch_units
        .iter()
        .map(|u| &pairs[u.index].fixed)
        .find(|c| !c.rust)
        .map_or_else(|| std::path::PathBuf::from("cc"), |c| c.compiler.clone());
    let library = scratch.library_path();
    let (linked, records) = scratch.link(&compiler, &patch_units, &emitted, render, &library)?;
    report.finish(&emitted, &records, linked);
    report.output = Some(options.output.display().to_string());
    // The library must read back as the patch it claims to be.
    hotpatch::patchfile::PatchSpec::read(&library, &Default::default())
        .map_err(|e| BuildError::Link(format!("the linked patch does not read back: {e}")))?;
    let library = std::fs::read(&library).map_err(|e| BuildError::Object {
        path: library.clone(),
        what: e.to_string(),
    })?;
    Ok(Built { report, library })
}

/// The units that make up `--binary`: a unit none of whose functions the
/// binary has belongs to another program of the build (a test, a tool) and
/// is left out; of two compiles of one source (a PIC and a non-PIC copy),
/// the one whose code is the binary's. A unit whose functions are in the
/// binary with other code stops the build.
#[allow(clippy::type_complexity)]
fn units_of_the_binary(
    all: &[tree::Pair],
    running: &binary::Binary<'_>,
    path: &Path,
) -> Result<(Vec<tree::Pair>, Vec<unit::Unit>, Vec<unit::Unit>, binary::Proof), BuildError> {
    let mut candidates = Vec::new();
    // Of units the binary has nothing of, the differences, in case no
    // unit is the binary's at all.
    let mut unmatched = Vec::new();
    for p in all {
        let orig = read_unit(&p.orig.kept)?;
        // The build's own object where there is one: the binary's bytes.
        let proof = match &p.orig.plain {
            Some(plain) => running.prove(&[&read_unit(plain)?]),
            None => running.prove(&[&orig]),
        };
        if proof.matched == 0 {
            unmatched.extend(
                proof
                    .mismatches
                    .iter()
                    .map(|m| format!("`{}` {}", m.function, m.what)),
            );
            continue;
        }
        candidates.push((p, orig, proof));
    }
    let source_of = |p: &tree::Pair| p.orig.cwd.join(&p.orig.source);
    let mut total = binary::Proof::default();
    let mut mismatches = Vec::new();
    let (mut pairs, mut origs, mut fixeds) = (Vec::new(), Vec::new(), Vec::new());
    for (p, orig, proof) in &candidates {
        let exact = proof.mismatches.is_empty();
        let twin_is_exact = candidates.iter().any(|(q, _, qp)| {
            !std::ptr::eq(*q, *p) && source_of(q) == source_of(p) && qp.mismatches.is_empty()
        });
        if !exact {
            if !twin_is_exact {
                mismatches.extend(
                    proof
                        .mismatches
                        .iter()
                        .map(|m| format!("`{}` {}", m.function, m.what)),
                );
            }
            continue;
        }
        if pairs.iter().any(|q: &tree::Pair| source_of(q) == source_of(p)) {
            continue;
        }
        total.matched += proof.matched;
        total.absent += proof.absent;
        pairs.push((*p).clone());
        origs.push(orig.clone());
        fixeds.push(read_unit(&p.fixed.kept)?);
    }
    if !mismatches.is_empty() || pairs.is_empty() {
        if mismatches.is_empty() && pairs.is_empty() {
            mismatches = unmatched;
        }
        if mismatches.is_empty() {
            mismatches.push(format!(
                "none of the {} compiled units has a function in its symbol table (stripped, or another program?)",
                all.len()
            ));
        }
        return Err(BuildError::NotTheBinary {
            binary: path.to_path_buf(),
            mismatches,
        });
    }
    Ok((pairs, origs, fixeds, total))
}

/// Say for each chosen function whether the fix edits its own lines and
/// which edited functions were inlined into it (from the fixed build's
/// DWARF; nothing is said without it).
fn explain(
    report: &mut Report,
    options: &Options,
    pairs: &[tree::Pair],
    fixed: &[unit::Unit],
    selection: &select::Selection,
) {
    let Ok(diff) = std::fs::read_to_string(&options.diff) else {
        return;
    };
    let lines = inlining::changed_lines(&diff, options.strip);
    let wanted: std::collections::BTreeSet<usize> = selection.chosen.iter().map(|c| c.unit).collect();
    for u in wanted {
        let Some(source) = fixed[u].source.as_deref() else {
            continue;
        };
        let edited_lines = lines
            .iter()
            .find(|(path, _)| same_file(path, source))
            .map(|(_, l)| l.clone())
            .unwrap_or_default();
        let Some(info) = std::fs::read(&pairs[u].fixed.kept)
            .ok()
            .and_then(|d| inlining::read(&d))
        else {
            continue;
        };
        let edited = info.edited(&edited_lines);
        for (c, f) in selection.chosen.iter().zip(report.functions.iter_mut()) {
            if c.unit != u {
                continue;
            }
            f.source_edited = Some(edited.contains(&c.name));
            f.inlines_edited = info
                .inlined
                .get(&c.name)
                .map(|inl| inl.intersection(&edited).cloned().collect())
                .unwrap_or_default();
        }
    }
}

/// A type whose layout the fix changes, in a unit the patch replaces code
/// of: the program's objects of that type keep the old layout, and old and
/// new code would disagree on it. From the DWARF of both builds; the units
/// without it are returned as not checked.
fn layout_refusals(
    pairs: &[tree::Pair],
    selection: &select::Selection,
) -> (Vec<select::Refusal>, Vec<String>) {
    let wanted: std::collections::BTreeSet<usize> = selection.chosen.iter().map(|c| c.unit).collect();
    let mut refusals = Vec::new();
    let mut unchecked = Vec::new();
    for u in wanted {
        let read = |path: &Path| std::fs::read(path).ok().and_then(|d| inlining::read(&d));
        let (Some(orig), Some(fixed)) = (read(&pairs[u].orig.kept), read(&pairs[u].fixed.kept)) else {
            unchecked.push(pairs[u].key.clone());
            continue;
        };
        for (name, old, new) in inlining::changed_layouts(&orig, &fixed) {
            let size = |l: &str| l.split('|').next().unwrap_or("?").to_string();
            let what = if size(&old) != size(&new) {
                format!("{} → {} bytes", size(&old), size(&new))
            } else {
                "its members moved or changed type".to_string()
            };
            refusals.push(select::Refusal {
                symbol: format!("type `{name}` ({})", pairs[u].key),
                reason: format!(
                    "changed layout ({what}): objects the program already holds keep the old one, and old and new code would disagree on it"
                ),
            });
        }
    }
    (refusals, unchecked)
}

/// Whether a diff's path and a unit's source name the same file.
fn same_file(a: &str, b: &str) -> bool {
    let (long, short) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    long == short || long.ends_with(&format!("/{short}"))
}

fn refused(refusals: &[select::Refusal], report: Report) -> BuildError {
    BuildError::Refused(
        refusals
            .iter()
            .map(|r| (r.symbol.clone(), r.reason.clone()))
            .collect(),
        Box::new(report),
    )
}

fn read_unit(path: &Path) -> Result<unit::Unit, BuildError> {
    let data = std::fs::read(path).map_err(|e| BuildError::Object {
        path: path.to_path_buf(),
        what: e.to_string(),
    })?;
    unit::read(&data).map_err(|e| BuildError::Object {
        path: path.to_path_buf(),
        what: e.to_string(),
    })
}
