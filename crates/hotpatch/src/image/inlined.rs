//! Functions the compiler inlined into every caller, from DWARF. Pure:
//! reads section bytes given to it. Used on the error path of a lookup
//! only (a name with no symbol): it walks the whole `.debug_info`.

use gimli::{AttributeValue, DebugInfoOffset, EndianSlice, LittleEndian, Unit};
use std::collections::{BTreeSet, HashSet};

type Reader<'d> = EndianSlice<'d, LittleEndian>;

/// If the debug info has a function named `name` (`DW_AT_name` or
/// `DW_AT_linkage_name`) that was inlined (`DW_AT_inline`) and has no
/// out-of-line instance (no concrete `DW_TAG_subprogram` with code of its
/// own refers to it): the functions it was inlined into, sorted (their
/// names, where the debug info gives them). `None` when there is no such
/// function, no debug info, or it cannot be read.
///
/// `section` gives a section's bytes by name (`.debug_info`…),
/// uncompressed; `None` for a section the image lacks.
pub fn inlined_everywhere<'d>(section: impl Fn(&str) -> Option<&'d [u8]>, name: &str) -> Option<Vec<String>> {
    if section(".debug_info").is_none_or(<[u8]>::is_empty) {
        return None;
    }
    let dwarf = gimli::Dwarf::load(|id: gimli::SectionId| -> Result<Reader<'d>, gimli::Error> {
        Ok(EndianSlice::new(section(id.name()).unwrap_or(&[]), LittleEndian))
    })
    .ok()?;
    // 1. The abstract instances named `name`.
    let mut abstracts: HashSet<DebugInfoOffset> = HashSet::new();
    let mut headers = dwarf.units();
    while let Ok(Some(header)) = headers.next() {
        let Ok(unit) = dwarf.unit(header) else {
            continue;
        };
        let mut entries = unit.entries();
        while let Ok(Some(entry)) = entries.next_dfs() {
            if entry.tag() != gimli::DW_TAG_subprogram || !entry.has_attr(gimli::DW_AT_inline) {
                continue;
            }
            let named = [gimli::DW_AT_linkage_name, gimli::DW_AT_name]
                .into_iter()
                .filter_map(|at| entry.attr_value(at))
                .any(|v| {
                    dwarf
                        .attr_string(&unit, v)
                        .is_ok_and(|s| s.slice() == name.as_bytes())
                });
            if named && let Some(at) = entry.offset().to_debug_info_offset(&unit.header) {
                abstracts.insert(at);
            }
        }
    }
    if abstracts.is_empty() {
        return None;
    }
    // 2. Where they were inlined, and whether any has code of its own.
    let mut callers: BTreeSet<String> = BTreeSet::new();
    let mut headers = dwarf.units();
    while let Ok(Some(header)) = headers.next() {
        let Ok(unit) = dwarf.unit(header) else {
            continue;
        };
        // The concrete functions enclosing the current entry: (depth, name).
        let mut enclosing: Vec<(isize, Option<String>)> = Vec::new();
        let mut entries = unit.entries();
        while let Ok(Some(entry)) = entries.next_dfs() {
            let depth = entry.depth();
            while enclosing.last().is_some_and(|(d, _)| *d >= depth) {
                enclosing.pop();
            }
            let origin = entry
                .attr_value(gimli::DW_AT_abstract_origin)
                .and_then(|v| global_offset(&unit, v));
            let refers = origin.is_some_and(|o| abstracts.contains(&o));
            match entry.tag() {
                gimli::DW_TAG_subprogram => {
                    let concrete = entry.has_attr(gimli::DW_AT_low_pc) || entry.has_attr(gimli::DW_AT_ranges);
                    if concrete && refers {
                        // An out-of-line copy: it has code, and a symbol
                        // somewhere (perhaps a clone's name).
                        return None;
                    }
                    if concrete {
                        enclosing.push((depth, subprogram_name(&dwarf, &unit, entry)));
                    }
                }
                gimli::DW_TAG_inlined_subroutine if refers => {
                    if let Some(caller) = enclosing.iter().rev().find_map(|(_, n)| n.clone()) {
                        callers.insert(caller);
                    }
                }
                _ => {}
            }
        }
    }
    Some(callers.into_iter().collect())
}

/// A reference attribute as an offset into `.debug_info`.
fn global_offset(unit: &Unit<Reader<'_>>, value: AttributeValue<Reader<'_>>) -> Option<DebugInfoOffset> {
    match value {
        AttributeValue::UnitRef(at) => at.to_debug_info_offset(&unit.header),
        AttributeValue::DebugInfoRef(at) => Some(at),
        _ => None,
    }
}

/// A concrete function's name: its own, or its abstract instance's or
/// declaration's (same unit).
fn subprogram_name(
    dwarf: &gimli::Dwarf<Reader<'_>>,
    unit: &Unit<Reader<'_>>,
    entry: &gimli::DebuggingInformationEntry<Reader<'_>>,
) -> Option<String> {
    let own = |e: &gimli::DebuggingInformationEntry<Reader<'_>>| {
        [gimli::DW_AT_name, gimli::DW_AT_linkage_name]
            .into_iter()
            .filter_map(|at| e.attr_value(at))
            .find_map(|v| dwarf.attr_string(unit, v).ok())
            .map(|s| String::from_utf8_lossy(s.slice()).into_owned())
    };
    if let Some(n) = own(entry) {
        return Some(n);
    }
    for at in [gimli::DW_AT_abstract_origin, gimli::DW_AT_specification] {
        if let Some(AttributeValue::UnitRef(offset)) = entry.attr_value(at)
            && let Ok(origin) = unit.entry(offset)
            && let Some(n) = own(&origin)
        {
            return Some(n);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Image;
    use hotpatch_testkit::build::build_sources;

    const SOURCE: &str = r#"
static int everywhere(int x) { return x * 3 + 1; }
static int __attribute__((noinline)) outlined(int x) { return x * 5 + 2; }
int first(int x) { return everywhere(x) + outlined(x); }
int second(int x) { return everywhere(x + 1) - outlined(x); }
int main(int argc, char **argv) { (void)argv; return first(argc) + second(argc); }
"#;

    fn answer(image: &Image, name: &str) -> Option<Vec<String>> {
        inlined_everywhere(|s| image.section_data(s), name)
    }

    #[test]
    fn a_function_inlined_into_its_callers() {
        let dir = tempfile::tempdir().unwrap();
        let exe = build_sources(dir.path(), "gcc", "inl", &[("inl.c", SOURCE)], &["-O2", "-g"]);
        let image = Image::open(&exe).unwrap();
        let mut callers = answer(&image, "everywhere").expect("inlined everywhere");
        // gcc may inline first() and second() into main, too.
        callers.retain(|c| c != "main");
        assert_eq!(callers, ["first", "second"]);
        // Has code of its own, or is no function at all.
        assert_eq!(answer(&image, "outlined"), None);
        assert_eq!(answer(&image, "first"), None);
        assert_eq!(answer(&image, "no_such"), None);
        // No debug info: nothing to say.
        let bare = build_sources(dir.path(), "gcc", "bare", &[("bare.c", SOURCE)], &["-O2"]);
        assert_eq!(answer(&Image::open(&bare).unwrap(), "everywhere"), None);
    }
}
