//! From what changed to what the patch replaces, and what it must refuse.
//! Pure: the running binary is asked through [`Running`].
//!
//! - A changed function is replaced in the running binary.
//! - A changed function the binary cannot reach by name — a compiler-made
//!   part or clone (`.cold`, `.part.N`, `.isra.N`, `.constprop.N`, whose
//!   calling convention may differ between the builds), or one the binary
//!   has no out-of-line copy of — is carried in the patch, and every
//!   function that refers to it is replaced instead, up to functions that
//!   can be.
//! - A changed constant is carried; every function that reads it is replaced.
//! - Refused, naming the symbol: changed size or initial value of data the
//!   program already holds, any new or changed thread-local, a changed
//!   constructor (it ran once and will not run again), a changed function
//!   the running binary cannot patch (too small, …).

use crate::compare::Changes;
use crate::unit::{Class, Target, Unit};
use std::collections::{BTreeSet, VecDeque};

/// The running binary, as the selection needs it.
pub trait Running {
    /// `None`: no such function in the binary; `Some(Err(why))`: there, but
    /// it cannot be patched; `Some(Ok(n))`: it can, and code of the binary
    /// calls it directly `n` times although it was built without padding
    /// (gcc's interprocedural register allocation may then let a caller
    /// rely on registers the function happens not to touch).
    fn function(&self, source: Option<&str>, name: &str, global: bool) -> Option<Result<usize, String>>;
}

/// One translation unit's two builds.
pub struct UnitPair<'a> {
    pub orig: &'a Unit,
    pub fixed: &'a Unit,
    pub changes: &'a Changes,
}

/// Why a function is in the patch.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "reason", content = "of")]
pub enum Reason {
    /// Its code or its references differ between the builds.
    Changed,
    /// It refers to a changed function that cannot be replaced by name.
    Refers(String),
    /// It reads a changed constant.
    ReadsChangedConstant(String),
    /// It calls a replaced function of its unit directly, in a binary built
    /// without padding: replaced together, the new caller calls the new
    /// callee with the register use the patch compile agreed on, and only
    /// calls already in progress in the old caller reach the replacement
    /// through the old direct call.
    CallsDirectly(String),
}

/// A function of the fixed build that the patch holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Chosen {
    pub unit: usize,
    pub name: String,
    pub global: bool,
    pub reasons: BTreeSet<Reason>,
    /// Whether the running binary's function of this name is replaced
    /// (otherwise the patch only carries it, for the functions that are).
    pub replaced: bool,
}

/// What a function swap cannot do.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Refusal {
    /// As the running binary names it (`file.c:name` for a static).
    pub symbol: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Selection {
    pub chosen: Vec<Chosen>,
    pub refusals: Vec<Refusal>,
    /// Changed constants the patch carries: (unit, name).
    pub constants: Vec<(usize, String)>,
    /// Data only the fixed build has, carried at its initial value: (unit, name, class, size).
    pub new_data: Vec<(usize, String, Class, u64)>,
}

impl Selection {
    pub fn find(&self, unit: usize, name: &str) -> Option<&Chosen> {
        self.chosen.iter().find(|c| c.unit == unit && c.name == name)
    }
}

/// Choose the functions of the patch.
pub fn select(units: &[UnitPair<'_>], running: &dyn Running) -> Selection {
    let mut selection = Selection::default();
    let mut queue: VecDeque<(usize, String, Reason)> = VecDeque::new();
    for (u, pair) in units.iter().enumerate() {
        for name in &pair.changes.changed {
            queue.push_back((u, name.clone(), Reason::Changed));
        }
        for d in &pair.changes.changed_data {
            match d.class {
                Class::Const => {
                    selection.constants.push((u, d.name.clone()));
                    for caller in referrers(pair.fixed, &d.name) {
                        queue.push_back((u, caller, Reason::ReadsChangedConstant(d.name.clone())));
                    }
                }
                Class::ThreadLocal => selection.refusals.push(Refusal {
                    symbol: pair.fixed.shown(&d.name),
                    reason: format!("changed thread-local ({}): every thread holds its own copy already", d.what),
                }),
                _ => selection.refusals.push(Refusal {
                    symbol: pair.fixed.shown(&d.name),
                    reason: format!(
                        "changed data ({}): the running program holds this variable already, and a function swap cannot change its layout or value",
                        d.what
                    ),
                }),
            }
        }
        for (name, class, size) in &pair.changes.new_data {
            if *class == Class::ThreadLocal {
                selection.refusals.push(Refusal {
                    symbol: pair.fixed.shown(name),
                    reason: "new thread-local: threads that already run have no copy of it".into(),
                });
            } else {
                selection.new_data.push((u, name.clone(), *class, *size));
            }
        }
    }
    while let Some((u, name, reason)) = queue.pop_front() {
        if let Some(c) = selection
            .chosen
            .iter_mut()
            .find(|c| c.unit == u && c.name == name)
        {
            c.reasons.insert(reason);
            continue;
        }
        let pair = &units[u];
        let Some(item) = pair.fixed.functions.iter().find(|f| f.name == name) else {
            continue;
        };
        let source = pair.fixed.source.as_deref();
        if pair.orig.constructors.contains(&name) || pair.fixed.constructors.contains(&name) {
            selection.refusals.push(Refusal {
                symbol: pair.fixed.shown(&name),
                reason: "a constructor: it ran once when the program started and will not run again".into(),
            });
        }
        // The running binary's (the original build's) name for it.
        let orig_name = pair.changes.binary_name(&name);
        let existed = pair.orig.functions.iter().any(|f| f.name == orig_name);
        let replaced = if item.is_compiler_named() || !existed {
            false
        } else {
            match running.function(source, &orig_name, item.global) {
                Some(Ok(0)) => true,
                Some(Ok(_direct_calls)) if pair.orig.gcc => {
                    for caller in direct_callers(pair.orig, &orig_name) {
                        // The fixed build's name of that caller.
                        if let Some(f) = pair
                            .fixed
                            .functions
                            .iter()
                            .find(|f| pair.changes.binary_name(&f.name) == caller)
                        {
                            queue.push_back((u, f.name.clone(), Reason::CallsDirectly(name.clone())));
                        }
                    }
                    true
                }
                // Built by LLVM: no register allocation across calls.
                Some(Ok(_)) => true,
                Some(Err(why)) => {
                    selection.refusals.push(Refusal {
                        symbol: pair.fixed.shown(&name),
                        reason: format!("changed, but the running binary cannot patch it: {why}"),
                    });
                    true
                }
                None => false,
            }
        };
        if !replaced && existed {
            // Its callers take its place.
            for (cu, caller) in all_referrers(units, u, &name, item.global) {
                queue.push_back((cu, caller, Reason::Refers(name.clone())));
            }
        }
        selection.chosen.push(Chosen {
            unit: u,
            name,
            global: item.global,
            reasons: BTreeSet::from([reason]),
            replaced,
        });
    }
    selection
}

/// The functions of `unit` that refer to `name`.
fn referrers(unit: &Unit, name: &str) -> Vec<String> {
    unit.functions
        .iter()
        .filter(|f| {
            f.name != name
                && f.refs
                    .iter()
                    .any(|r| r.target == Target::Symbol(name.to_string()))
        })
        .map(|f| f.name.clone())
        .collect()
}

/// The functions of `unit` that call or jump to `name` directly.
fn direct_callers(unit: &Unit, name: &str) -> Vec<String> {
    unit.functions
        .iter()
        .filter(|f| {
            f.name != name
                && f.refs.iter().any(|r| {
                    r.target == Target::Symbol(name.to_string())
                        && matches!(r.r_type, object::elf::R_X86_64_PLT32 | object::elf::R_X86_64_PC32)
                })
        })
        .map(|f| f.name.clone())
        .collect()
}

/// The functions of every unit that can refer to `name` of unit `u`.
fn all_referrers(units: &[UnitPair<'_>], u: usize, name: &str, global: bool) -> Vec<(usize, String)> {
    units
        .iter()
        .enumerate()
        .filter(|(i, _)| *i == u || global)
        .flat_map(|(i, p)| referrers(p.fixed, name).into_iter().map(move |n| (i, n)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::compare;
    use crate::unit::{Item, Ref};

    struct Binary(Vec<(&'static str, Result<usize, String>)>);
    impl Running for Binary {
        fn function(&self, _: Option<&str>, name: &str, _: bool) -> Option<Result<usize, String>> {
            self.0.iter().find(|(n, _)| *n == name).map(|(_, r)| r.clone())
        }
    }

    fn f(name: &str, byte: u8, calls: &[&str]) -> Item {
        Item {
            name: name.into(),
            global: !name.contains('.'),
            section: format!(".text.{name}"),
            class: Class::Code,
            size: 1,
            bytes: vec![byte],
            refs: calls
                .iter()
                .map(|c| Ref {
                    offset: 0,
                    r_type: object::elf::R_X86_64_PLT32,
                    target: Target::Symbol(c.to_string()),
                    addend: -4,
                })
                .collect(),
        }
    }

    fn run(orig: Unit, fixed: Unit, binary: Binary) -> Selection {
        let changes = compare(&orig, &fixed);
        select(
            &[UnitPair {
                orig: &orig,
                fixed: &fixed,
                changes: &changes,
            }],
            &binary,
        )
    }

    #[test]
    fn a_changed_clone_is_carried_and_its_callers_replaced() {
        let orig = Unit {
            functions: vec![
                f("parse.isra.0", 1, &[]),
                f("parse_all", 2, &["parse.isra.0"]),
                f("top", 3, &["parse_all"]),
            ],
            ..Unit::default()
        };
        let mut fixed = orig.clone();
        fixed.functions[0].bytes = vec![9];
        let s = run(orig, fixed, Binary(vec![("parse_all", Ok(0)), ("top", Ok(0))]));
        let got: Vec<(&str, bool)> = s.chosen.iter().map(|c| (c.name.as_str(), c.replaced)).collect();
        assert_eq!(got, vec![("parse.isra.0", false), ("parse_all", true)]);
        assert_eq!(
            s.find(0, "parse_all").map(|c| c.reasons.clone()),
            Some(BTreeSet::from([Reason::Refers("parse.isra.0".into())]))
        );
        assert!(s.refusals.is_empty());
    }

    #[test]
    fn changed_writable_data_and_constructors_are_refused() {
        let mut orig = Unit {
            functions: vec![f("init", 1, &[])],
            data: vec![Item {
                class: Class::Writable,
                section: ".data.limit".into(),
                ..f("limit", 5, &[])
            }],
            ..Unit::default()
        };
        orig.constructors.insert("init".into());
        let mut fixed = orig.clone();
        fixed.functions[0].bytes = vec![2];
        fixed.data[0].bytes = vec![6];
        let s = run(orig, fixed, Binary(vec![("init", Ok(0))]));
        let refused: Vec<&str> = s.refusals.iter().map(|r| r.symbol.as_str()).collect();
        assert_eq!(refused, vec!["limit", "init"]);
        assert!(s.refusals[1].reason.contains("constructor"));
    }

    #[test]
    fn a_changed_constant_replaces_its_readers() {
        let orig = Unit {
            functions: vec![f("lookup", 1, &["table"]), f("other", 2, &[])],
            data: vec![Item {
                class: Class::Const,
                section: ".rodata.table".into(),
                ..f("table", 5, &[])
            }],
            ..Unit::default()
        };
        let mut fixed = orig.clone();
        fixed.data[0].bytes = vec![6];
        let s = run(orig, fixed, Binary(vec![("lookup", Ok(0)), ("other", Ok(0))]));
        assert_eq!(s.constants, vec![(0, "table".to_string())]);
        let got: Vec<&str> = s.chosen.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(got, vec!["lookup"]);
    }

    #[test]
    fn an_unpatchable_change_is_refused_with_the_reason() {
        let orig = Unit {
            functions: vec![f("tiny", 1, &[])],
            ..Unit::default()
        };
        let mut fixed = orig.clone();
        fixed.functions[0].bytes = vec![2];
        let s = run(
            orig,
            fixed,
            Binary(vec![("tiny", Err("3 bytes: too small".into()))]),
        );
        assert_eq!(s.refusals.len(), 1);
        assert!(s.refusals[0].reason.contains("too small"), "{:?}", s.refusals);
    }
}

#[cfg(test)]
mod direct_call_tests {
    use super::*;
    use crate::compare::compare;
    use crate::unit::{Item, Ref};

    struct Unprepared;
    impl Running for Unprepared {
        fn function(&self, _: Option<&str>, name: &str, _: bool) -> Option<Result<usize, String>> {
            Some(Ok(if name == "stored" { 1 } else { 0 }))
        }
    }

    #[test]
    fn the_direct_callers_of_an_unprepared_replaced_function_are_replaced_too() {
        let call = |to: &str, r_type| Ref {
            offset: 1,
            r_type,
            target: Target::Symbol(to.into()),
            addend: -4,
        };
        let f = |name: &str, byte: u8, refs: Vec<Ref>| Item {
            name: name.into(),
            global: name != "stored",
            section: format!(".text.{name}"),
            class: Class::Code,
            size: 1,
            bytes: vec![byte],
            refs,
        };
        let orig = Unit {
            gcc: true,
            functions: vec![
                f("stored", 1, vec![]),
                f("deflate", 2, vec![call("stored", object::elf::R_X86_64_PLT32)]),
                // Takes its address only: not a direct call.
                f("params", 3, vec![call("stored", object::elf::R_X86_64_64)]),
            ],
            ..Unit::default()
        };
        let mut fixed = orig.clone();
        fixed.functions[0].bytes = vec![9];
        let changes = compare(&orig, &fixed);
        let s = select(
            &[UnitPair {
                orig: &orig,
                fixed: &fixed,
                changes: &changes,
            }],
            &Unprepared,
        );
        let got: Vec<(&str, bool)> = s.chosen.iter().map(|c| (c.name.as_str(), c.replaced)).collect();
        assert_eq!(got, vec![("stored", true), ("deflate", true)]);
        assert_eq!(
            s.find(0, "deflate").map(|c| c.reasons.clone()),
            Some(BTreeSet::from([Reason::CallsDirectly("stored".into())]))
        );
    }
}
