//! The running binary (`--binary`): its functions, whether each can be
//! patched, and the proof that the original rebuild is this binary.

use crate::select::Running;
use crate::unit::{Unit, relaxed_span};
use hotpatch::Image;
use hotpatch::image::{SymbolKind, SymbolMatch};
use hotpatch::plan::{Method, Planner};

/// The binary, with its planner (the same verdicts as `hotpatch apply`).
pub struct Binary<'a> {
    image: &'a Image,
    planner: Planner<'a>,
}

/// How the binary names a symbol of a unit: `file.c:name` for a static.
pub fn query(source: Option<&str>, name: &str, global: bool) -> String {
    match source {
        Some(file) if !global => format!("{file}:{name}"),
        _ => name.to_string(),
    }
}

/// A function of the rebuild that is not the binary's.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Mismatch {
    pub function: String,
    pub what: String,
}

/// What the comparison of the rebuild with the binary found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Proof {
    /// Functions found in both, with the same code.
    pub matched: usize,
    /// Functions of the rebuild the binary has no symbol for (inlined,
    /// dropped by the linker).
    pub absent: usize,
    pub mismatches: Vec<Mismatch>,
}

impl<'a> Binary<'a> {
    pub fn new(image: &'a Image) -> Binary<'a> {
        Binary {
            image,
            planner: Planner::new(image),
        }
    }

    pub fn image(&self) -> &Image {
        self.image
    }

    /// The binary's symbol for `name` of a unit, if it has one.
    pub fn symbol(&self, source: Option<&str>, name: &str, global: bool) -> Option<SymbolMatch> {
        self.resolve(source, name, global).map(|(s, _)| s)
    }

    /// The symbol and the name that finds it in the binary.
    pub fn resolve(&self, source: Option<&str>, name: &str, global: bool) -> Option<(SymbolMatch, String)> {
        let q = query(source, name, global);
        match self.planner.symbol(&q) {
            Ok(s) => Some((s, q)),
            // A binary without file symbols still names a unique static.
            Err(_) if !global => self
                .planner
                .symbol(name)
                .ok()
                .filter(|s| !s.global)
                .map(|s| (s, name.to_string())),
            Err(_) => None,
        }
    }

    /// Compare every function of the original rebuild with the binary's
    /// code, ignoring the fields the linker fills in.
    pub fn prove(&self, units: &[&Unit]) -> Proof {
        let mut proof = Proof::default();
        for unit in units {
            for f in &unit.functions {
                let Some(sym) = self.symbol(unit.source.as_deref(), &f.name, f.global) else {
                    proof.absent += 1;
                    continue;
                };
                let shown = query(unit.source.as_deref(), &f.name, f.global);
                if sym.kind != SymbolKind::Function {
                    proof.mismatches.push(Mismatch {
                        function: shown,
                        what: "the binary's symbol of this name is not a function".into(),
                    });
                    continue;
                }
                if sym.size != f.size {
                    proof.mismatches.push(Mismatch {
                        function: shown,
                        what: format!("{} bytes in the binary, {} in the rebuild", sym.size, f.size),
                    });
                    continue;
                }
                let Some(code) = self.image.bytes_at(sym.address, sym.size) else {
                    proof.absent += 1;
                    continue;
                };
                let mut masked = vec![false; f.bytes.len()];
                for r in &f.refs {
                    let (before, after) = relaxed_span(r.r_type);
                    let start = r.offset.saturating_sub(before) as usize;
                    let end = (r.offset.saturating_add(after) as usize).min(masked.len());
                    for m in masked.iter_mut().take(end).skip(start) {
                        *m = true;
                    }
                }
                match (0..f.bytes.len()).find(|&i| !masked[i] && code[i] != f.bytes[i]) {
                    Some(i) => proof.mismatches.push(Mismatch {
                        function: shown,
                        what: format!(
                            "differs at +{i:#x}: {:#04x} in the binary, {:#04x} in the rebuild",
                            code[i], f.bytes[i]
                        ),
                    }),
                    None => proof.matched += 1,
                }
            }
        }
        proof
    }
}

impl Running for Binary<'_> {
    fn function(&self, source: Option<&str>, name: &str, global: bool) -> Option<Result<usize, String>> {
        let (sym, q) = self.resolve(source, name, global)?;
        if sym.kind != SymbolKind::Function {
            return None;
        }
        Some(
            self.planner
                .method(&q)
                .map(|(_, method)| match method {
                    Method::Prepared(_) => 0,
                    Method::Detour { direct_calls, .. } => direct_calls,
                })
                .map_err(|e| e.to_string()),
        )
    }
}
