//! The symbols an ELF file exports (`.dynsym`): what `dlsym` can find in
//! it, read without the rest of an [`super::Image`] (no `.symtab`, no
//! demangling). Used to find functions in a target's libc and in a patch
//! loaded into a target.

const PAGE: u64 = 0x1000;

/// A defined dynamic symbol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DynSym {
    pub value: u64,
    pub size: u64,
    pub st_type: u8,
    /// `SHN_ABS`: the value is not relocated.
    pub absolute: bool,
}

/// The symbols an ELF file exports (`.dynsym`, defined, global or weak, in
/// their default version): what `dlsym` can find in it. Much cheaper than a
/// full [`super::Image`] (no `.symtab`, no demangling).
#[derive(Debug)]
pub struct DynSymbols {
    /// Names with exactly one default-version definition.
    by_name: std::collections::HashMap<String, DynSym>,
    /// Names defined more than once (left to `dlsym`).
    ambiguous: std::collections::HashSet<String>,
    pub link_base: u64,
    /// `PT_DYNAMIC`'s address before relocation (checks a link map's `l_ld`).
    pub dynamic: Option<u64>,
}

impl DynSymbols {
    pub fn read(path: &std::path::Path) -> Result<DynSymbols, super::ImageError> {
        let data = super::file::read_image(path)?;
        Self::parse(&data).map_err(|what| super::ImageError::Corrupt {
            path: path.to_path_buf(),
            what,
        })
    }

    /// Like [`DynSymbols::read`], knowing only the symbols named in
    /// `names` (the others are not found): the file's headers, `.dynsym`,
    /// its strings and `.gnu.version` are read (`pread`, ~100 KiB of libc's
    /// 2 MiB), and only those names are indexed.
    pub fn read_names(path: &std::path::Path, names: &[&str]) -> Result<DynSymbols, super::ImageError> {
        let (file, _) = super::file::open_regular(path)?;
        let cache = object::read::ReadCache::new(file);
        let mut ident = [0u8; 16];
        ident.copy_from_slice(object::ReadRef::read_bytes_at(&cache, 0, 16).map_err(|()| {
            super::ImageError::Corrupt {
                path: path.to_path_buf(),
                what: "shorter than an ELF header".into(),
            }
        })?);
        super::error::check_ident(path, &ident)?;
        Self::parse_from(&cache, Some(names)).map_err(|what| super::ImageError::Corrupt {
            path: path.to_path_buf(),
            what,
        })
    }

    pub fn parse(data: &[u8]) -> Result<DynSymbols, String> {
        Self::parse_from(data, None)
    }

    /// The symbols of the ELF file `data`, every one or those in `names`.
    fn parse_from<'d, R: object::ReadRef<'d>>(data: R, names: Option<&[&str]>) -> Result<DynSymbols, String> {
        use object::elf;
        use object::read::elf::{FileHeader, ProgramHeader, SectionHeader, Sym};
        let e = |e: object::read::Error| e.to_string();
        let header = elf::FileHeader64::<object::Endianness>::parse(data).map_err(e)?;
        let endian = header.endian().map_err(e)?;
        let phdrs = header.program_headers(endian, data).map_err(e)?;
        let link_base = phdrs
            .iter()
            .filter(|p| p.p_type(endian) == elf::PT_LOAD)
            .map(|p| p.p_vaddr(endian) & !(PAGE - 1))
            .min()
            .unwrap_or(0);
        let dynamic = phdrs
            .iter()
            .find(|p| p.p_type(endian) == elf::PT_DYNAMIC)
            .map(|p| p.p_vaddr(endian));
        let sections = header.sections(endian, data).map_err(e)?;
        let symtab = sections.symbols(endian, data, elf::SHT_DYNSYM).map_err(e)?;
        let versions = sections.versions(endian, data).map_err(e)?;
        // The names in one read (through a read cache, each name would be
        // a read of its own).
        let names_bytes: &[u8] = match sections.section(symtab.string_section()) {
            Ok(section) => section.data(endian, data).map_err(e)?,
            Err(_) => &[],
        };
        let strings = object::read::StringTable::new(names_bytes, 0, names_bytes.len() as u64);
        let mut by_name = std::collections::HashMap::new();
        let mut ambiguous = std::collections::HashSet::new();
        for (index, sym) in symtab.enumerate() {
            let shndx = sym.st_shndx(endian);
            let bind = sym.st_bind();
            if shndx == elf::SHN_UNDEF || !(bind == elf::STB_GLOBAL || bind == elf::STB_WEAK) {
                continue;
            }
            if versions
                .as_ref()
                .is_some_and(|v| v.version_index(endian, index).is_hidden())
            {
                continue;
            }
            let Ok(name) = sym.name(endian, strings) else {
                continue;
            };
            let Ok(name) = std::str::from_utf8(name) else {
                continue;
            };
            if names.is_some_and(|wanted| !wanted.contains(&name)) {
                continue;
            }
            let entry = DynSym {
                value: sym.st_value(endian),
                size: sym.st_size(endian),
                st_type: sym.st_type(),
                absolute: shndx == elf::SHN_ABS,
            };
            if ambiguous.contains(name) {
                continue;
            }
            if by_name
                .insert(name.to_string(), entry)
                .is_some_and(|old| old != entry)
            {
                by_name.remove(name);
                ambiguous.insert(name.to_string());
            }
        }
        Ok(DynSymbols {
            by_name,
            ambiguous,
            link_base,
            dynamic,
        })
    }

    pub fn lookup(&self, name: &str) -> Option<&DynSym> {
        self.by_name.get(name)
    }

    /// The address `dlsym` returns for `name` in an object loaded with
    /// bias `l_addr`, when that is certain from the file alone: a plain
    /// function, object or untyped symbol, defined once. `None` for the
    /// rest (IFUNC, TLS, absolute, several versions, not defined here):
    /// ask `dlsym`.
    pub fn dlsym_address(&self, l_addr: u64, name: &str) -> Option<u64> {
        use object::elf;
        if self.ambiguous.contains(name) {
            return None;
        }
        let s = self.lookup(name)?;
        let plain = matches!(s.st_type, elf::STT_FUNC | elf::STT_OBJECT | elf::STT_NOTYPE);
        (plain && !s.absolute).then(|| s.value.wrapping_add(l_addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The C library of this machine, if it is where Debian puts it.
    fn libc() -> Option<std::path::PathBuf> {
        let p = std::path::PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6");
        p.exists().then_some(p)
    }

    #[test]
    fn reading_some_names_finds_what_reading_all_finds() {
        let Some(path) = libc() else {
            eprintln!("no /lib/x86_64-linux-gnu/libc.so.6 here: nothing to compare");
            return;
        };
        let all = DynSymbols::read(&path).expect("libc");
        // Defined once, several versions (dlopen: GLIBC_2.34 and a
        // compat one), absent.
        let names = [
            "dlopen",
            "dlsym",
            "__errno_location",
            "memcpy",
            "no_such_symbol_here",
        ];
        let some = DynSymbols::read_names(&path, &names).expect("libc");
        for n in names {
            assert_eq!(some.lookup(n), all.lookup(n), "{n}");
            assert_eq!(some.dlsym_address(0x1000, n), all.dlsym_address(0x1000, n), "{n}");
        }
        assert!(some.lookup("dlopen").is_some());
        assert!(
            some.lookup("strlen").is_none(),
            "a name not asked for is not known"
        );
        assert_eq!((some.link_base, some.dynamic), (all.link_base, all.dynamic));
    }

    #[test]
    fn reading_names_of_a_non_elf_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("not-elf");
        std::fs::write(&p, b"#!/bin/sh\necho hello\n").expect("write");
        assert!(DynSymbols::read_names(&p, &["dlopen"]).is_err());
        let short = dir.path().join("short");
        std::fs::write(&short, b"\x7fEL").expect("write");
        assert!(DynSymbols::read_names(&short, &["dlopen"]).is_err());
    }
}
