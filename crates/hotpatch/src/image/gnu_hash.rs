//! `.gnu.hash`: the dynamic linker's index of `.dynsym`, used to find an
//! exported name without reading every symbol (pure: table bytes in,
//! symbol indices out).
//!
//! Layout: `nbuckets`, `symoffset`, `bloom_size`, `bloom_shift` (u32 each),
//! `bloom_size` u64 bloom words, `nbuckets` u32 buckets (the first symbol
//! index of each chain), then one u32 per symbol from `symoffset` on: its
//! hash with the low bit set on the last symbol of a chain. Symbols below
//! `symoffset` (undefined ones, usually) are not in the table.

use object::Endianness;
use object::elf;
use object::read::elf::Sym;

/// The GNU hash of a name (`h = h * 33 + c`, from 5381).
pub fn hash(name: &[u8]) -> u32 {
    name.iter()
        .fold(5381u32, |h, &c| h.wrapping_mul(33).wrapping_add(u32::from(c)))
}

/// A parsed `.gnu.hash` section.
#[derive(Debug, Clone, Copy)]
pub struct GnuHash<'a> {
    symoffset: u32,
    bloom_shift: u32,
    bloom: &'a [u8],
    buckets: &'a [u8],
    chains: &'a [u8],
}

fn u32_at(bytes: &[u8], index: usize) -> Option<u32> {
    let at = index.checked_mul(4)?;
    Some(u32::from_le_bytes(
        bytes.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

impl<'a> GnuHash<'a> {
    /// Parse the section's bytes; `None` if they are too short for the
    /// sizes the header gives or the table is empty.
    pub fn parse(section: &'a [u8]) -> Option<GnuHash<'a>> {
        let nbuckets = usize::try_from(u32_at(section, 0)?).ok()?;
        let symoffset = u32_at(section, 1)?;
        let bloom_size = usize::try_from(u32_at(section, 2)?).ok()?;
        let bloom_shift = u32_at(section, 3)?;
        if nbuckets == 0 || bloom_size == 0 {
            return None;
        }
        let bloom_end = 16usize.checked_add(bloom_size.checked_mul(8)?)?;
        let buckets_end = bloom_end.checked_add(nbuckets.checked_mul(4)?)?;
        Some(GnuHash {
            symoffset,
            bloom_shift,
            bloom: section.get(16..bloom_end)?,
            buckets: section.get(bloom_end..buckets_end)?,
            chains: section.get(buckets_end..)?,
        })
    }

    /// The first symbol index the table covers.
    pub fn symoffset(&self) -> u32 {
        self.symoffset
    }

    /// The indices (into `symbols`) of every symbol the table lists under
    /// `name`, in table order: several versions of a name share a chain.
    /// Names are read from `strings` (`.dynstr`). `None` if the table
    /// points outside `symbols` or its own chains (a corrupt table).
    pub fn find(
        &self,
        endian: Endianness,
        symbols: &[elf::Sym64<Endianness>],
        strings: &[u8],
        name: &[u8],
    ) -> Option<Vec<usize>> {
        let h = hash(name);
        let words = self.bloom.len() / 8;
        let w = (h / 64) as usize % words;
        let word = u64::from_le_bytes(self.bloom.get(8 * w..8 * w + 8)?.try_into().ok()?);
        let bits = (1u64 << (h % 64)) | (1u64 << (h.wrapping_shr(self.bloom_shift) % 64));
        if word & bits != bits {
            return Some(Vec::new());
        }
        let buckets = self.buckets.len() / 4;
        let mut index = u32_at(self.buckets, h as usize % buckets)?;
        if index < self.symoffset {
            // 0: an empty bucket; any other index below the table is corrupt.
            return (index == 0).then(Vec::new);
        }
        let mut found = Vec::new();
        loop {
            let value = u32_at(self.chains, usize::try_from(index - self.symoffset).ok()?)?;
            if value | 1 == h | 1 {
                let sym = symbols.get(usize::try_from(index).ok()?)?;
                let offset = usize::try_from(sym.st_name(endian)).ok()?;
                let rest = strings.get(offset..)?;
                if rest
                    .strip_prefix(name)
                    .is_some_and(|after| after.first() == Some(&0))
                {
                    found.push(index as usize);
                }
            }
            if value & 1 != 0 {
                return Some(found);
            }
            index = index.checked_add(1)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object::read::elf::{FileHeader, SectionHeader};
    use proptest::prelude::*;

    const LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";

    struct Tables {
        hash: Vec<u8>,
        symbols: Vec<elf::Sym64<Endianness>>,
        strings: Vec<u8>,
    }

    fn tables(path: &std::path::Path) -> Option<Tables> {
        let data = std::fs::read(path).ok()?;
        let header = elf::FileHeader64::<Endianness>::parse(&*data).ok()?;
        let sections = header.sections(Endianness::Little, &*data).ok()?;
        let (hash, _) = sections
            .iter()
            .find(|s| s.sh_type(Endianness::Little) == elf::SHT_GNU_HASH)
            .and_then(|s| Some((s.data(Endianness::Little, &*data).ok()?, ())))?;
        let table = sections
            .symbols(Endianness::Little, &*data, elf::SHT_DYNSYM)
            .ok()?;
        let strings = sections
            .section(table.string_section())
            .ok()?
            .data(Endianness::Little, &*data)
            .ok()?;
        Some(Tables {
            hash: hash.to_vec(),
            symbols: table.symbols().to_vec(),
            strings: strings.to_vec(),
        })
    }

    /// The indices a linear scan finds for `name`, from `symoffset` on.
    fn linear(t: &Tables, from: u32, name: &[u8]) -> Vec<usize> {
        t.symbols
            .iter()
            .enumerate()
            .skip(from as usize)
            .filter(|(_, s)| {
                let rest = &t.strings[s.st_name(Endianness::Little) as usize..];
                rest.strip_prefix(name).is_some_and(|a| a.first() == Some(&0))
            })
            .map(|(i, _)| i)
            .collect()
    }

    fn agree_on_every_symbol(path: &std::path::Path) {
        let t = tables(path).unwrap_or_else(|| panic!("{}: no .gnu.hash/.dynsym", path.display()));
        let table = GnuHash::parse(&t.hash).unwrap();
        let mut names = 0;
        for s in t.symbols.iter().skip(table.symoffset() as usize) {
            let rest = &t.strings[s.st_name(Endianness::Little) as usize..];
            let name = &rest[..rest.iter().position(|&b| b == 0).unwrap()];
            let found = table.find(Endianness::Little, &t.symbols, &t.strings, name);
            assert_eq!(
                found,
                Some(linear(&t, table.symoffset(), name)),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(name)
            );
            names += 1;
        }
        assert!(names > 3, "{}: {names} names", path.display());
    }

    #[test]
    fn hash_of_known_names() {
        // Values from the dynamic linker's own definition.
        assert_eq!(hash(b""), 5381);
        assert_eq!(hash(b"printf"), 0x156b_2bb8);
        assert_eq!(hash(b"exit"), 0x7c96_7e3f);
    }

    #[test]
    fn lookup_agrees_with_a_linear_scan_on_libc_and_a_built_binary() {
        if std::fs::metadata(LIBC).is_ok() {
            agree_on_every_symbol(std::path::Path::new(LIBC));
        }
        let dir = tempfile::tempdir().unwrap();
        let source = "int alpha(int x) { return x + 1; }\nint beta(int x) { return alpha(x) * 2; }\n\
                      int gamma_(int x) { return beta(x) - 3; }\nint main(void) { return gamma_(1); }\n";
        let exe =
            hotpatch_testkit::build::build_unprepared(dir.path(), "cc", "hashed", source, &["-rdynamic"]);
        agree_on_every_symbol(&exe);
    }

    #[test]
    fn a_corrupt_table_is_refused_not_followed() {
        // One bucket pointing past the symbols; a bloom word with all bits.
        let mut t = Vec::new();
        for v in [1u32, 1, 1, 0] {
            t.extend_from_slice(&v.to_le_bytes());
        }
        t.extend_from_slice(&u64::MAX.to_le_bytes());
        t.extend_from_slice(&1000u32.to_le_bytes());
        t.extend_from_slice(&0u32.to_le_bytes());
        let table = GnuHash::parse(&t).unwrap();
        assert_eq!(table.find(Endianness::Little, &[], b"\0", b"x"), None);
        assert!(GnuHash::parse(&t[..20]).is_none());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Random names (and pieces of real ones) are found, or not, alike.
        #[test]
        fn random_names_agree_with_a_linear_scan(
            name in prop_oneof![
                "[a-z_]{1,12}",
                Just("malloc".to_string()),
                Just("memcpy".to_string()),
                Just("__libc_start_main".to_string()),
            ]
        ) {
            let Some(t) = tables(std::path::Path::new(LIBC)) else { return Ok(()); };
            let table = GnuHash::parse(&t.hash).unwrap();
            let found = table.find(Endianness::Little, &t.symbols, &t.strings, name.as_bytes());
            prop_assert_eq!(found, Some(linear(&t, table.symoffset(), name.as_bytes())));
        }
    }
}
