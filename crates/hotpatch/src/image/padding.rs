//! `__patchable_function_entries`: the list of padded functions that
//! `-fpatchable-function-entry` emits, one 8-byte address per function
//! pointing at its first padding byte.

use object::Endianness;
use object::ReadRef;
use object::elf;
use object::read::elf::{Rela, SectionHeader, SectionTable};
use std::collections::HashMap;

type Header = elf::FileHeader64<Endianness>;

pub const SECTION_NAME: &[u8] = b"__patchable_function_entries";

/// Every site listed in the image's `__patchable_function_entries`
/// section(s), sorted and deduplicated.
///
/// In a PIE linked by rust-lld the section's file bytes are zero and each
/// value is the addend of an `R_X86_64_RELATIVE` dynamic relocation at that
/// slot; those are applied here. Entries that stay zero (functions removed
/// by `--gc-sections`) are dropped.
pub(super) fn read_sites<'d, R: ReadRef<'d>>(
    endian: Endianness,
    data: R,
    sections: &SectionTable<'d, Header, R>,
) -> Result<Vec<u64>, String> {
    let mut relative: Option<HashMap<u64, u64>> = None;
    let mut sites = Vec::new();
    for (_, section) in sections.enumerate() {
        if sections.section_name(endian, section) != Ok(SECTION_NAME)
            || section.sh_type(endian) == elf::SHT_NOBITS
        {
            continue;
        }
        let bytes = section
            .data(endian, data)
            .map_err(|e| format!("{}: {}", String::from_utf8_lossy(SECTION_NAME), e))?;
        let base = section.sh_addr(endian);
        for (i, chunk) in bytes.chunks_exact(8).enumerate() {
            let mut value = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
            if value == 0 {
                let relocs = relative.get_or_insert_with(|| relative_relocations(endian, data, sections));
                let slot = base.checked_add(8 * i as u64);
                value = slot.and_then(|slot| relocs.get(&slot)).copied().unwrap_or(0);
            }
            if value != 0 {
                sites.push(value);
            }
        }
    }
    sites.sort_unstable();
    sites.dedup();
    Ok(sites)
}

/// `r_offset → r_addend` for every `R_X86_64_RELATIVE` in allocated RELA
/// sections (`.rela.dyn`). Unreadable sections are skipped: the sites they
/// would have resolved stay unknown rather than wrong.
fn relative_relocations<'d, R: ReadRef<'d>>(
    endian: Endianness,
    data: R,
    sections: &SectionTable<'d, Header, R>,
) -> HashMap<u64, u64> {
    let mut map = HashMap::new();
    for section in sections.iter() {
        if section.sh_flags(endian) & u64::from(elf::SHF_ALLOC) == 0 {
            continue;
        }
        let Ok(Some((relas, _))) = section.rela(endian, data) else {
            continue;
        };
        for rela in relas {
            if rela.r_type(endian, false) == elf::R_X86_64_RELATIVE {
                map.insert(rela.r_offset(endian), rela.r_addend(endian) as u64);
            }
        }
    }
    map
}
