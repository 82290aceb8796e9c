//! What a build selected and why: for people and for `--json`.

use crate::Options;
use crate::binary::{Proof, query};
use crate::compare::Changes;
use crate::emit::{Binding, Emitted};
use crate::select::{Reason, Refusal, Selection};
use crate::tree::{Linked, Pair};
use crate::unit::{Class, Unit};
use std::collections::BTreeSet;
use std::fmt::Write as _;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Target {
    /// How the records name the image (its file name, or its soname).
    pub image: String,
    pub path: String,
    pub build_id: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct UnitReport {
    pub source: Option<String>,
    pub object: String,
    pub changed: Vec<String>,
    pub new_functions: Vec<String>,
    pub removed_functions: Vec<String>,
    pub changed_data: Vec<String>,
    pub new_data: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FunctionReport {
    /// The binary's name for it.
    pub name: String,
    /// Replaced in the running binary, or only carried for those that are.
    pub replaced: bool,
    pub reasons: BTreeSet<Reason>,
    /// Whether the fix edits this function's own lines (`None`: no debug
    /// info to tell).
    pub source_edited: Option<bool>,
    /// Functions the fix edits that the compiler inlined into this one.
    pub inlines_edited: Vec<String>,
}

/// The build's report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub target: Target,
    /// The original rebuild against the binary.
    pub proof: Proof,
    pub units: Vec<UnitReport>,
    pub functions: Vec<FunctionReport>,
    /// Other code and data the patch carries (compiler clones, functions the
    /// binary has no copy of, new data, changed constants).
    pub carried: Vec<String>,
    pub bindings: Vec<Binding>,
    pub refusals: Vec<Refusal>,
    /// Units whose type layouts could not be compared (no debug info).
    pub unchecked_layouts: Vec<String>,
    pub records: Vec<String>,
    pub output: Option<String>,
    pub linked: Option<Linked>,
}

impl Report {
    pub fn new(
        options: &Options,
        image: &hotpatch::Image,
        pairs: &[Pair],
        fixed: &[Unit],
        changes: &[Changes],
        selection: &Selection,
        proof: Proof,
    ) -> Report {
        let file_name = options
            .binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let units = pairs
            .iter()
            .zip(fixed)
            .zip(changes)
            .filter(|(_, c)| **c != Changes::default())
            .map(|((p, u), c)| UnitReport {
                source: u.source.clone(),
                object: p.key.clone(),
                changed: c.changed.clone(),
                new_functions: c.new_functions.clone(),
                removed_functions: c.removed_functions.clone(),
                changed_data: c
                    .changed_data
                    .iter()
                    .map(|d| format!("{} ({})", d.name, d.what))
                    .collect(),
                new_data: c.new_data.iter().map(|d| d.0.clone()).collect(),
            })
            .collect();
        let functions = selection
            .chosen
            .iter()
            .map(|c| FunctionReport {
                name: query(
                    fixed[c.unit].source.as_deref(),
                    &changes[c.unit].binary_name(&c.name),
                    c.global,
                ),
                replaced: c.replaced,
                reasons: c.reasons.clone(),
                source_edited: None,
                inlines_edited: Vec::new(),
            })
            .collect();
        let mut carried: Vec<String> = selection
            .new_data
            .iter()
            .map(|(u, n, class, size)| {
                format!(
                    "{} (new {} data, {size} bytes, starts at its initial value)",
                    query(fixed[*u].source.as_deref(), n, false),
                    if *class == Class::Const {
                        "constant"
                    } else {
                        "writable"
                    }
                )
            })
            .collect();
        carried.extend(selection.constants.iter().map(|(u, n)| {
            format!(
                "{} (changed constant)",
                query(fixed[*u].source.as_deref(), n, false)
            )
        }));
        Report {
            target: Target {
                image: image.soname().map(str::to_string).unwrap_or(file_name),
                path: options.binary.display().to_string(),
                build_id: image.build_id_hex(),
            },
            proof,
            units,
            functions,
            carried,
            bindings: Vec::new(),
            refusals: selection.refusals.clone(),
            unchecked_layouts: Vec::new(),
            records: Vec::new(),
            output: None,
            linked: None,
        }
    }

    pub fn finish(&mut self, emitted: &Emitted, records: &[String], linked: Linked) {
        self.carried.extend(
            emitted
                .carried
                .iter()
                .map(|c| format!("{c} (copied: not reachable by name in the binary)")),
        );
        self.bindings = emitted.bindings.iter().cloned().collect();
        self.records = records.to_vec();
        self.linked = Some(linked);
    }

    /// The report for people.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "target {} (build-id {}): the original rebuild matches it ({} functions compared, {} not in its symbol table)",
            self.target.path,
            self.target.build_id.as_deref().unwrap_or("none"),
            self.proof.matched,
            self.proof.absent
        );
        for u in &self.units {
            let _ = writeln!(s, "unit {} ({})", u.source.as_deref().unwrap_or("?"), u.object);
            for (what, list) in [
                ("changed", &u.changed),
                ("new", &u.new_functions),
                ("removed", &u.removed_functions),
                ("changed data", &u.changed_data),
                ("new data", &u.new_data),
            ] {
                if !list.is_empty() {
                    let _ = writeln!(s, "  {what}: {}", list.join(", "));
                }
            }
        }
        for f in &self.functions {
            let why: Vec<String> = f
                .reasons
                .iter()
                .map(|r| match r {
                    Reason::Changed => {
                        let mut why = "its code changed".to_string();
                        let mut how = Vec::new();
                        if f.source_edited == Some(true) {
                            how.push("the fix edits it".to_string());
                        }
                        for inner in &f.inlines_edited {
                            how.push(format!("edited `{inner}` is inlined into it"));
                        }
                        if !how.is_empty() {
                            why = format!("{why} ({})", how.join("; "));
                        }
                        why
                    }
                    Reason::Refers(x) => {
                        format!("it refers to changed `{x}`, which cannot be replaced by name")
                    }
                    Reason::ReadsChangedConstant(x) => format!("it reads changed constant `{x}`"),
                    Reason::CallsDirectly(x) => format!(
                        "it calls replaced `{x}` directly in a binary built without padding (apply needs --allow-direct-calls for `{x}`: only calls already in progress in the old caller reach it that way)"
                    ),
                })
                .collect();
            let _ = writeln!(
                s,
                "{} {}: {}",
                if f.replaced { "replace" } else { "carry  " },
                f.name,
                why.join("; ")
            );
        }
        for c in &self.carried {
            let _ = writeln!(s, "carry   {c}");
        }
        if !self.bindings.is_empty() {
            let names: Vec<&str> = self
                .bindings
                .iter()
                .map(|b| b.symbol.as_str())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let _ = writeln!(s, "bound to the running binary: {}", names.join(", "));
        }
        if !self.unchecked_layouts.is_empty() {
            let _ = writeln!(
                s,
                "not checked for changed type layouts (no debug info; build with -g to check): {}",
                self.unchecked_layouts.join(", ")
            );
        }
        for r in &self.refusals {
            let _ = writeln!(s, "refused {}: {}", r.symbol, r.reason);
        }
        if let (Some(out), Some(l)) = (&self.output, &self.linked) {
            let _ = writeln!(
                s,
                "wrote {out} ({} bytes, {} records)",
                l.bytes,
                self.records.len()
            );
        }
        s
    }
}
