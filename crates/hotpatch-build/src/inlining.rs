//! Why a function's code changed: its own source lines, or a function the
//! compiler inlined into it. From the fixed object's DWARF (when the build
//! has `-g`) and the diff's changed lines. Pure: bytes and text in.

use object::read::elf::ElfFile64;
use object::{Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// What the DWARF of one object says about its functions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inlining {
    /// Function → the functions inlined into its code (by name, once each).
    pub inlined: BTreeMap<String, BTreeSet<String>>,
    /// Function → the line of the unit's file it is declared at.
    pub declared: BTreeMap<String, u64>,
    /// The unit's file as DWARF names it.
    pub file: Option<String>,
    /// Named structure, union and class types: their size and each
    /// member's name, offset and type name (`size|m@0:int|…`).
    pub layouts: BTreeMap<String, String>,
}

/// The new-side lines a unified diff adds or removes at, per file (the
/// path as in `+++ b/PATH`, `strip` leading components removed).
pub fn changed_lines(diff: &str, strip: u32) -> BTreeMap<String, BTreeSet<u64>> {
    let mut out: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    let mut file: Option<String> = None;
    let mut line = 0u64;
    for text in diff.lines() {
        if let Some(path) = text.strip_prefix("+++ ") {
            let path = path.split('\t').next().unwrap_or("").trim();
            let stripped: String = path.split('/').skip(strip as usize).collect::<Vec<_>>().join("/");
            file = (path != "/dev/null").then_some(stripped);
            continue;
        }
        if text.starts_with("--- ") {
            continue;
        }
        if let Some(rest) = text.strip_prefix("@@ ") {
            // @@ -a,b +c,d @@
            line = rest
                .split_whitespace()
                .find_map(|w| w.strip_prefix('+'))
                .and_then(|w| w.split(',').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            continue;
        }
        let Some(f) = &file else { continue };
        match text.as_bytes().first() {
            Some(b'+') => {
                out.entry(f.clone()).or_default().insert(line);
                line += 1;
            }
            Some(b'-') => {
                out.entry(f.clone()).or_default().insert(line);
            }
            Some(b' ') | None => line += 1,
            _ => {}
        }
    }
    out
}

impl Inlining {
    /// The functions whose declaration-to-next-declaration span of the
    /// unit's file holds one of `lines`.
    pub fn edited(&self, lines: &BTreeSet<u64>) -> BTreeSet<String> {
        let mut starts: Vec<(u64, &str)> = self.declared.iter().map(|(n, &l)| (l, n.as_str())).collect();
        starts.sort();
        let mut edited = BTreeSet::new();
        for (i, &(start, name)) in starts.iter().enumerate() {
            let end = starts.get(i + 1).map_or(u64::MAX, |&(l, _)| l);
            if lines.range(start..end).next().is_some() {
                edited.insert(name.to_string());
            }
        }
        edited
    }
}

/// Read the DWARF of a relocatable object (its `.debug_*` relocations
/// applied first). `None` when it has none or it cannot be read.
pub fn read(data: &[u8]) -> Option<Inlining> {
    let file = ElfFile64::<object::Endianness>::parse(data).ok()?;
    let mut sections: HashMap<String, Vec<u8>> = HashMap::new();
    for s in file.sections() {
        let Ok(name) = s.name() else { continue };
        if !name.starts_with(".debug_") {
            continue;
        }
        let mut bytes = s.data().ok()?.to_vec();
        for (offset, r) in s.relocations() {
            let RelocationFlags::Elf { r_type } = r.flags() else {
                continue;
            };
            let base = match r.target() {
                RelocationTarget::Symbol(i) => file.symbol_by_index(i).map(|s| s.address()).unwrap_or(0),
                _ => 0,
            };
            let value = base.wrapping_add(r.addend() as u64);
            let at = offset as usize;
            match r_type {
                object::elf::R_X86_64_32 => {
                    if let Some(b) = bytes.get_mut(at..at.saturating_add(4)) {
                        b.copy_from_slice(&(value as u32).to_le_bytes());
                    }
                }
                object::elf::R_X86_64_64 => {
                    if let Some(b) = bytes.get_mut(at..at.saturating_add(8)) {
                        b.copy_from_slice(&value.to_le_bytes());
                    }
                }
                _ => {}
            }
        }
        sections.insert(name.to_string(), bytes);
    }
    if !sections.contains_key(".debug_info") {
        return None;
    }
    let empty: Vec<u8> = Vec::new();
    let load = |id: gimli::SectionId| -> Result<gimli::EndianSlice<'_, gimli::LittleEndian>, gimli::Error> {
        let bytes = sections.get(id.name()).unwrap_or(&empty);
        Ok(gimli::EndianSlice::new(bytes, gimli::LittleEndian))
    };
    let dwarf = gimli::Dwarf::load(load).ok()?;
    let mut out = Inlining::default();
    let mut headers = dwarf.units();
    while let Ok(Some(header)) = headers.next() {
        let Ok(unit) = dwarf.unit(header) else { continue };
        if out.file.is_none()
            && let Some(name) = unit.name
        {
            out.file = Some(name.to_string_lossy().into_owned());
        }
        let name_of = |offset: gimli::UnitOffset| -> Option<String> {
            let mut at = offset;
            for _ in 0..4 {
                let entry = unit.entry(at).ok()?;
                // The symbol's name: C++'s mangled one where there is one.
                if let Some(v) = entry
                    .attr_value(gimli::DW_AT_linkage_name)
                    .or_else(|| entry.attr_value(gimli::DW_AT_MIPS_linkage_name))
                    .or_else(|| entry.attr_value(gimli::DW_AT_name))
                {
                    return dwarf
                        .attr_string(&unit, v)
                        .ok()
                        .map(|s| s.to_string_lossy().into_owned());
                }
                match entry
                    .attr_value(gimli::DW_AT_abstract_origin)
                    .or_else(|| entry.attr_value(gimli::DW_AT_specification))
                {
                    Some(gimli::AttributeValue::UnitRef(next)) => at = next,
                    _ => return None,
                }
            }
            None
        };
        let mut cursor = unit.entries();
        // (depth, name) of the concrete functions around the cursor.
        let mut around: Vec<(isize, String)> = Vec::new();
        while let Ok(Some(entry)) = cursor.next_dfs() {
            let depth = entry.depth();
            while around.last().is_some_and(|(d, _)| *d >= depth) {
                around.pop();
            }
            match entry.tag() {
                gimli::DW_TAG_subprogram => {
                    let Some(name) = name_of(entry.offset()) else {
                        continue;
                    };
                    if let Some(gimli::AttributeValue::Udata(line)) = entry.attr_value(gimli::DW_AT_decl_line)
                    {
                        out.declared.entry(name.clone()).or_insert(line);
                    }
                    let concrete = entry.has_attr(gimli::DW_AT_low_pc) || entry.has_attr(gimli::DW_AT_ranges);
                    if concrete {
                        around.push((depth, name));
                    }
                }
                gimli::DW_TAG_structure_type | gimli::DW_TAG_union_type | gimli::DW_TAG_class_type => {
                    let size = match entry.attr_value(gimli::DW_AT_byte_size) {
                        Some(gimli::AttributeValue::Udata(n)) => n,
                        _ => continue,
                    };
                    let Some(name) = entry
                        .attr_value(gimli::DW_AT_name)
                        .and_then(|v| dwarf.attr_string(&unit, v).ok())
                        .map(|s| s.to_string_lossy().into_owned())
                    else {
                        continue;
                    };
                    if let Some(layout) = layout_of(&dwarf, &unit, entry.offset(), size) {
                        out.layouts.entry(name).or_insert(layout);
                    }
                }
                gimli::DW_TAG_inlined_subroutine => {
                    if let (Some((_, outer)), Some(gimli::AttributeValue::UnitRef(origin))) =
                        (around.last(), entry.attr_value(gimli::DW_AT_abstract_origin))
                        && let Some(inner) = name_of(origin)
                    {
                        out.inlined.entry(outer.clone()).or_default().insert(inner);
                    }
                }
                _ => {}
            }
        }
    }
    Some(out)
}

type Slice<'a> = gimli::EndianSlice<'a, gimli::LittleEndian>;

/// `size|member@offset:type|…` of the aggregate type at `offset`.
fn layout_of(
    dwarf: &gimli::Dwarf<Slice<'_>>,
    unit: &gimli::Unit<Slice<'_>>,
    offset: gimli::UnitOffset,
    size: u64,
) -> Option<String> {
    let name_at = |at: gimli::UnitOffset| -> String {
        let Ok(e) = unit.entry(at) else { return "?".into() };
        match e
            .attr_value(gimli::DW_AT_name)
            .and_then(|v| dwarf.attr_string(unit, v).ok())
        {
            Some(n) => n.to_string_lossy().into_owned(),
            None => format!("<{}>", e.tag()),
        }
    };
    let mut tree = unit.entries_tree(Some(offset)).ok()?;
    let root = tree.root().ok()?;
    let mut children = root.children();
    let mut layout = size.to_string();
    while let Ok(Some(child)) = children.next() {
        let e = child.entry();
        if e.tag() != gimli::DW_TAG_member {
            continue;
        }
        let member = e
            .attr_value(gimli::DW_AT_name)
            .and_then(|v| dwarf.attr_string(unit, v).ok())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let at = match e.attr_value(gimli::DW_AT_data_member_location) {
            Some(gimli::AttributeValue::Udata(n)) => n.to_string(),
            Some(gimli::AttributeValue::Sdata(n)) => n.to_string(),
            _ => "?".into(),
        };
        let ty = match e.attr_value(gimli::DW_AT_type) {
            Some(gimli::AttributeValue::UnitRef(t)) => name_at(t),
            _ => "?".into(),
        };
        layout.push_str(&format!("|{member}@{at}:{ty}"));
    }
    Some(layout)
}

/// The named types whose layout differs between two builds of a unit
/// (types only one build has are not compared).
pub fn changed_layouts(orig: &Inlining, fixed: &Inlining) -> Vec<(String, String, String)> {
    fixed
        .layouts
        .iter()
        .filter_map(|(name, new)| {
            let old = orig.layouts.get(name)?;
            (old != new).then(|| (name.clone(), old.clone(), new.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_lines_of_a_unified_diff() {
        let diff = "\
--- a/src/counter.c\t2026-01-01
+++ b/src/counter.c\t2026-01-01
@@ -7,7 +7,7 @@ static int scale(int x)
 
 static int scale(int x)
 {
-    return x * 2;
+    return x * 3;
 }
 
 long add(int x)
@@ -30,2 +30,3 @@
 a
+b
 c
";
        let lines = changed_lines(diff, 1);
        assert_eq!(
            lines
                .get("src/counter.c")
                .map(|s| s.iter().copied().collect::<Vec<_>>()),
            Some(vec![10, 31])
        );
    }

    #[test]
    fn edited_functions_by_declaration_spans() {
        let inlining = Inlining {
            declared: BTreeMap::from([("scale".into(), 8), ("add".into(), 14), ("total".into(), 30)]),
            ..Inlining::default()
        };
        assert_eq!(
            inlining.edited(&BTreeSet::from([10])),
            BTreeSet::from(["scale".to_string()])
        );
        assert_eq!(inlining.edited(&BTreeSet::from([2])), BTreeSet::new());
        assert_eq!(
            inlining.edited(&BTreeSet::from([31, 15])),
            BTreeSet::from(["add".to_string(), "total".to_string()])
        );
    }

    #[test]
    fn layouts_that_differ_are_found_and_new_types_are_not_compared() {
        let orig = Inlining {
            layouts: BTreeMap::from([
                ("stats".into(), "16|adds@0:long|last@8:long".into()),
                ("same".into(), "4|x@0:int".into()),
            ]),
            ..Inlining::default()
        };
        let fixed = Inlining {
            layouts: BTreeMap::from([
                ("stats".into(), "24|first@0:long|adds@8:long|last@16:long".into()),
                ("same".into(), "4|x@0:int".into()),
                ("fresh".into(), "8|y@0:long".into()),
            ]),
            ..Inlining::default()
        };
        let changed: Vec<String> = changed_layouts(&orig, &fixed).into_iter().map(|c| c.0).collect();
        assert_eq!(changed, vec!["stats"]);
    }

    #[test]
    fn no_dwarf_is_none() {
        assert_eq!(read(b"junk"), None);
    }
}
