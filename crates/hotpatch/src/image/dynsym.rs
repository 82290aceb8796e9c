//! The symbols an ELF file exports (`.dynsym`): what `dlsym` can find in
//! it, read without the rest of an [`super::Image`] (no `.symtab`, no
//! demangling). Used to find functions in a target's libc and in a patch
//! loaded into a target.

const PAGE: u64 = 0x1000;

/// A defined dynamic symbol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DynSym {
    pub value: u64,
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

    pub fn parse(data: &[u8]) -> Result<DynSymbols, String> {
        use object::elf;
        use object::read::elf::{FileHeader, ProgramHeader, Sym};
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
            let Ok(name) = sym.name(endian, symtab.strings()) else {
                continue;
            };
            let Ok(name) = std::str::from_utf8(name) else {
                continue;
            };
            let entry = DynSym {
                value: sym.st_value(endian),
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
