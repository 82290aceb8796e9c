//! The two builds of one translation unit, compared item by item. Pure.
//!
//! Two functions are the same when their bytes (relocated fields zeroed)
//! and their references (type, target named by symbol or by content,
//! addend) are the same. A numbered static local (`count.0`) is matched by
//! its base name when that base is unique in the unit, since the number
//! shifts when statics are added before it.

use crate::unit::{Class, Item, Ref, Target, Unit};
use std::collections::{BTreeMap, HashMap};

/// What changed in one unit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Functions whose code or references differ.
    pub changed: Vec<String>,
    /// Functions only in the fixed build.
    pub new_functions: Vec<String>,
    /// Functions only in the original build.
    pub removed_functions: Vec<String>,
    /// Data in both builds whose class, size, initial bytes or references differ.
    pub changed_data: Vec<DataChange>,
    /// Data only in the fixed build: (name, class, size).
    pub new_data: Vec<(String, Class, u64)>,
    pub removed_data: Vec<String>,
    /// A fixed-build name → the original build's name of the same static
    /// local, where the numbering moved.
    pub renamed: BTreeMap<String, String>,
    /// A name without LLVM's `.llvm.N` suffix → the original build's name
    /// (the suffix hashes the module, so every build has another).
    pub stable_orig: BTreeMap<String, String>,
}

impl Changes {
    /// The original build's (the running binary's) name of a symbol named
    /// `name` in the fixed build or in the patch compile.
    pub fn binary_name(&self, name: &str) -> String {
        self.renamed
            .get(name)
            .or_else(|| self.stable_orig.get(stable_name(name)))
            .cloned()
            .unwrap_or_else(|| name.to_string())
    }
}

/// `name` without LLVM's `.llvm.<digits>` suffix (a function ThinLTO made
/// global: rustc and clang's ThinLTO builds).
pub fn stable_name(name: &str) -> &str {
    match name.rsplit_once(".llvm.") {
        Some((base, n)) if !base.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => base,
        _ => name,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataChange {
    pub name: String,
    pub class: Class,
    pub what: String,
}

/// `base.N` → `base.#` for local data whose base is unique in the unit.
pub fn canonical_names(unit: &Unit) -> HashMap<String, String> {
    let mut bases: HashMap<&str, usize> = HashMap::new();
    for d in unit.data.iter().filter(|d| !d.global) {
        if let Some(base) = numbered_base(&d.name) {
            *bases.entry(base).or_default() += 1;
        }
    }
    let mut names: HashMap<String, String> = unit
        .data
        .iter()
        .filter(|d| !d.global)
        .filter_map(|d| {
            let base = numbered_base(&d.name)?;
            (bases.get(base) == Some(&1)).then(|| (d.name.clone(), format!("{base}.#")))
        })
        .collect();
    for item in unit.functions.iter().chain(&unit.data) {
        let stable = stable_name(&item.name);
        if stable != item.name {
            names.insert(item.name.clone(), stable.to_string());
        }
    }
    names
}

/// `count` of `count.12`; `None` for other names.
fn numbered_base(name: &str) -> Option<&str> {
    let (base, n) = name.rsplit_once('.')?;
    (!base.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then_some(base)
}

fn canonical<'a>(names: &'a HashMap<String, String>, name: &'a str) -> &'a str {
    names
        .get(name)
        .map(String::as_str)
        .unwrap_or_else(|| stable_name(name))
}

fn same_refs(a: &[Ref], an: &HashMap<String, String>, b: &[Ref], bn: &HashMap<String, String>) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.offset == y.offset
                && x.r_type == y.r_type
                && x.addend == y.addend
                && match (&x.target, &y.target) {
                    (Target::Symbol(p), Target::Symbol(q)) => canonical(an, p) == canonical(bn, q),
                    (p, q) => p == q,
                }
        })
}

/// Compare the original and the fixed build of one unit.
pub fn compare(orig: &Unit, fixed: &Unit) -> Changes {
    let on = canonical_names(orig);
    let fname = canonical_names(fixed);
    let mut changes = Changes::default();
    let orig_functions: HashMap<&str, &Item> = orig
        .functions
        .iter()
        .map(|f| (canonical(&on, &f.name), f))
        .collect();
    let fixed_functions: HashMap<&str, &Item> = fixed
        .functions
        .iter()
        .map(|f| (canonical(&fname, &f.name), f))
        .collect();
    for item in orig.functions.iter().chain(&orig.data) {
        let stable = stable_name(&item.name);
        if stable != item.name {
            changes.stable_orig.insert(stable.to_string(), item.name.clone());
        }
    }
    for f in &fixed.functions {
        match orig_functions.get(canonical(&fname, &f.name)) {
            None => changes.new_functions.push(f.name.clone()),
            Some(o) => {
                if o.name != f.name {
                    changes.renamed.insert(f.name.clone(), o.name.clone());
                }
                if o.bytes != f.bytes || !same_refs(&o.refs, &on, &f.refs, &fname) {
                    changes.changed.push(f.name.clone());
                }
            }
        }
    }
    for o in &orig.functions {
        if !fixed_functions.contains_key(canonical(&on, &o.name)) {
            changes.removed_functions.push(o.name.clone());
        }
    }
    let orig_data: HashMap<&str, &Item> = orig.data.iter().map(|d| (canonical(&on, &d.name), d)).collect();
    let fixed_data: HashMap<&str, &Item> = fixed
        .data
        .iter()
        .map(|d| (canonical(&fname, &d.name), d))
        .collect();
    for d in &fixed.data {
        let key = canonical(&fname, &d.name);
        let Some(o) = orig_data.get(key) else {
            changes.new_data.push((d.name.clone(), d.class, d.size));
            continue;
        };
        if o.name != d.name {
            changes.renamed.insert(d.name.clone(), o.name.clone());
        }
        let what = if o.class != d.class {
            Some(format!("moved from {:?} to {:?} memory", o.class, d.class))
        } else if o.size != d.size {
            Some(format!("size {} → {} bytes", o.size, d.size))
        } else if o.bytes != d.bytes || !same_refs(&o.refs, &on, &d.refs, &fname) {
            Some("initial value changed".to_string())
        } else {
            None
        };
        if let Some(what) = what {
            changes.changed_data.push(DataChange {
                name: d.name.clone(),
                class: d.class,
                what,
            });
        }
    }
    for o in &orig.data {
        if !fixed_data.contains_key(canonical(&on, &o.name)) {
            changes.removed_data.push(o.name.clone());
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(name: &str, bytes: &[u8], refs: Vec<Ref>) -> Item {
        Item {
            name: name.into(),
            global: false,
            section: format!(".text.{name}"),
            class: Class::Code,
            size: bytes.len() as u64,
            bytes: bytes.to_vec(),
            refs,
        }
    }

    fn data(name: &str, class: Class, bytes: &[u8]) -> Item {
        Item {
            class,
            section: format!(".data.{name}"),
            ..item(name, bytes, vec![])
        }
    }

    fn call(to: &str) -> Ref {
        Ref {
            offset: 1,
            r_type: object::elf::R_X86_64_PLT32,
            target: Target::Symbol(to.into()),
            addend: -4,
        }
    }

    #[test]
    fn code_and_reference_changes_are_found_and_nothing_else() {
        let orig = Unit {
            functions: vec![
                item("same", &[0xe8, 0, 0, 0, 0, 0xc3], vec![call("g")]),
                item("code", &[0x31, 0xc0, 0xc3], vec![]),
                item("callee", &[0xe8, 0, 0, 0, 0, 0xc3], vec![call("g")]),
                item("gone", &[0xc3], vec![]),
            ],
            ..Unit::default()
        };
        let fixed = Unit {
            functions: vec![
                item("same", &[0xe8, 0, 0, 0, 0, 0xc3], vec![call("g")]),
                item("code", &[0x31, 0xd2, 0xc3], vec![]),
                item("callee", &[0xe8, 0, 0, 0, 0, 0xc3], vec![call("h")]),
                item("fresh", &[0xc3], vec![]),
            ],
            ..Unit::default()
        };
        let c = compare(&orig, &fixed);
        assert_eq!(c.changed, vec!["code", "callee"]);
        assert_eq!(c.new_functions, vec!["fresh"]);
        assert_eq!(c.removed_functions, vec!["gone"]);
    }

    #[test]
    fn a_renumbered_static_local_is_the_same_variable() {
        let orig = Unit {
            data: vec![data("calls.0", Class::Writable, &[0; 4])],
            functions: vec![item(
                "f",
                &[0; 6],
                vec![Ref {
                    target: Target::Symbol("calls.0".into()),
                    ..call("x")
                }],
            )],
            ..Unit::default()
        };
        let fixed = Unit {
            data: vec![
                data("calls.1", Class::Writable, &[0; 4]),
                data("other", Class::Writable, &[0; 4]),
            ],
            functions: vec![item(
                "f",
                &[0; 6],
                vec![Ref {
                    target: Target::Symbol("calls.1".into()),
                    ..call("x")
                }],
            )],
            ..Unit::default()
        };
        let c = compare(&orig, &fixed);
        assert!(c.changed.is_empty(), "{c:?}");
        assert_eq!(c.renamed.get("calls.1").map(String::as_str), Some("calls.0"));
        assert_eq!(c.new_data, vec![("other".to_string(), Class::Writable, 4)]);
        assert!(c.changed_data.is_empty());
    }

    #[test]
    fn data_changes_say_what_changed() {
        let orig = Unit {
            data: vec![
                data("size", Class::Writable, &[0; 4]),
                data("init", Class::Writable, &[1, 0, 0, 0]),
                data("table", Class::Const, &[1, 2]),
            ],
            ..Unit::default()
        };
        let fixed = Unit {
            data: vec![
                data("size", Class::Writable, &[0; 8]),
                data("init", Class::Writable, &[2, 0, 0, 0]),
                data("table", Class::Const, &[1, 3]),
            ],
            ..Unit::default()
        };
        let c = compare(&orig, &fixed);
        let whats: Vec<(&str, &str)> = c
            .changed_data
            .iter()
            .map(|d| (d.name.as_str(), d.what.as_str()))
            .collect();
        assert_eq!(
            whats,
            vec![
                ("size", "size 4 → 8 bytes"),
                ("init", "initial value changed"),
                ("table", "initial value changed")
            ]
        );
    }

    #[test]
    fn llvm_suffixes_do_not_make_a_function_new() {
        let orig = Unit {
            functions: vec![
                item("w.llvm.111", &[1], vec![call("g.llvm.5")]),
                item("g.llvm.5", &[2], vec![]),
            ],
            ..Unit::default()
        };
        let fixed = Unit {
            functions: vec![
                item("w.llvm.222", &[1], vec![call("g.llvm.6")]),
                item("g.llvm.6", &[3], vec![]),
            ],
            ..Unit::default()
        };
        let c = compare(&orig, &fixed);
        assert_eq!(c.changed, vec!["g.llvm.6"]);
        assert!(
            c.new_functions.is_empty() && c.removed_functions.is_empty(),
            "{c:?}"
        );
        assert_eq!(c.binary_name("g.llvm.999"), "g.llvm.5");
        assert_eq!(stable_name("f.llvm.12"), "f");
        assert_eq!(stable_name("f.llvm.x"), "f.llvm.x");
    }

    #[test]
    fn ambiguous_numbered_names_are_not_merged() {
        let u = Unit {
            data: vec![
                data("n.0", Class::Writable, &[0]),
                data("n.1", Class::Writable, &[0]),
            ],
            ..Unit::default()
        };
        assert!(canonical_names(&u).is_empty());
    }
}
