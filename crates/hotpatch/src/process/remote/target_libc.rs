//! The target's libc: its functions found from its file, and the record
//! of them a session leaves in the call region for the next.

use super::*;

/// The target's libc, as mapped: its dynamic symbols and load bias.
#[derive(Debug)]
pub struct TargetLibc {
    pub path: String,
    pub bias: u64,
    symbols: DynSymbols,
}

impl TargetLibc {
    /// Find the C library mapped by `pid` (glibc `libc.so.6`, or musl's
    /// `ld-musl-*.so.1`) and read its dynamic symbols from the file.
    pub fn find(pid: i32, maps: &[MapEntry]) -> Result<TargetLibc, ProcessError> {
        let images = crate::process::maps::images(maps, pid);
        let libc = images
            .iter()
            .find(|i| crate::reserved::is_c_library(&i.path))
            .ok_or_else(|| ProcessError::SymbolNotFound {
                pid,
                name: "libc".into(),
                image: "the process's mappings (statically linked?)".into(),
            })?;
        let symbols = DynSymbols::read(&libc.open_path).map_err(|e| ProcessError::Image {
            pid,
            path: libc.open_path.clone(),
            error: Box::new(e),
        })?;
        Ok(TargetLibc {
            path: libc.path.clone(),
            bias: libc.base.wrapping_sub(symbols.link_base),
            symbols,
        })
    }

    /// The run-time address of function `name`, if libc exports it.
    pub fn function(&self, name: &str) -> Option<u64> {
        self.symbols
            .lookup(name)
            .filter(|s| s.st_type == object::elf::STT_FUNC)
            .map(|s| s.value.wrapping_add(self.bias))
    }
}

/// The libc functions a session needs on every run, recorded in the call
/// region ([`Layout::info`]) so that a later session need not read libc's
/// file (~2 MiB) again: libc does not move in a live process.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct LibcInfo {
    pub(super) path: Option<String>,
    pub(super) functions: Vec<(String, u64)>,
}

impl LibcInfo {
    const MAGIC: &'static [u8; 8] = b"HPLIBC01";
    pub(super) fn of(libc: Option<&TargetLibc>) -> LibcInfo {
        let Some(libc) = libc else {
            return LibcInfo::default();
        };
        LibcInfo {
            path: Some(libc.path.clone()),
            // The functions the tool calls; a patch may not replace them.
            functions: crate::reserved::CALLED
                .iter()
                .filter_map(|c| Some((c.name.to_string(), libc.function(c.name)?)))
                .collect(),
        }
    }

    pub(super) fn get(&self, name: &str) -> Option<u64> {
        self.functions.iter().find(|(n, _)| n == name).map(|&(_, a)| a)
    }

    /// The record in the region, if it holds a valid one.
    pub(super) fn read(mem: &Mem, layout: &Layout) -> Option<LibcInfo> {
        let head = mem.read(layout.info(), 12).ok()?;
        if &head[..8] != Self::MAGIC {
            return None;
        }
        let len = u32::from_le_bytes(head[8..12].try_into().ok()?) as u64;
        if len > stub::INFO_SIZE - 12 - NAME_ROOM {
            return None;
        }
        let json = mem.read(layout.info() + 12, len as usize).ok()?;
        serde_json::from_slice(&json).ok()
    }

    pub(super) fn write(&self, mem: &Mem, layout: &Layout) -> Result<(), ProcessError> {
        let json = serde_json::to_vec(self).unwrap_or_default();
        if json.len() as u64 > stub::INFO_SIZE - 12 - NAME_ROOM {
            return Ok(());
        }
        let mut bytes = Self::MAGIC.to_vec();
        bytes.extend_from_slice(&(json.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&json);
        mem.write(layout.info(), &bytes)
    }
}

/// A defined dynamic symbol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DynSym {
    pub(super) value: u64,
    pub(super) st_type: u8,
    /// `SHN_ABS`: the value is not relocated.
    pub(super) absolute: bool,
}

/// The symbols an ELF file exports (`.dynsym`, defined, global or weak, in
/// their default version): what `dlsym` can find in it. Much cheaper than a
/// full [`Image`] (no `.symtab`, no demangling).
#[derive(Debug)]
pub(super) struct DynSymbols {
    /// Names with exactly one default-version definition.
    pub(super) by_name: std::collections::HashMap<String, DynSym>,
    /// Names defined more than once (left to `dlsym`).
    pub(super) ambiguous: std::collections::HashSet<String>,
    pub(super) link_base: u64,
    /// `PT_DYNAMIC`'s address before relocation (checks a link map's `l_ld`).
    pub(super) dynamic: Option<u64>,
}

impl DynSymbols {
    pub(super) fn read(path: &std::path::Path) -> Result<DynSymbols, crate::image::ImageError> {
        let data = crate::image::file::read_image(path)?;
        Self::parse(&data).map_err(|what| crate::image::ImageError::Corrupt {
            path: path.to_path_buf(),
            what,
        })
    }

    pub(super) fn parse(data: &[u8]) -> Result<DynSymbols, String> {
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

    pub(super) fn lookup(&self, name: &str) -> Option<&DynSym> {
        self.by_name.get(name)
    }

    /// The address `dlsym` returns for `name` in an object loaded with
    /// bias `l_addr`, when that is certain from the file alone: a plain
    /// function, object or untyped symbol, defined once. `None` for the
    /// rest (IFUNC, TLS, absolute, several versions, not defined here):
    /// ask `dlsym`.
    pub(super) fn dlsym_address(&self, l_addr: u64, name: &str) -> Option<u64> {
        use object::elf;
        if self.ambiguous.contains(name) {
            return None;
        }
        let s = self.lookup(name)?;
        let plain = matches!(s.st_type, elf::STT_FUNC | elf::STT_OBJECT | elf::STT_NOTYPE);
        (plain && !s.absolute).then(|| s.value.wrapping_add(l_addr))
    }
}
