//! ELF images: the facts about one x86-64 executable or shared library that
//! patching needs — its functions (from `.symtab` and `.dynsym`), its GNU
//! build-id, its prepared (padded) sites, and its code bytes by address.
//!
//! This layer reads files and nothing else. Everything it reports comes from
//! the file; the load address of a mapped copy is the caller's business.

mod dynsym;
mod error;
pub mod file;
pub mod gnu_hash;
mod image_file;
pub mod inlined;
pub mod lookup;
mod padding;
pub mod suggestion;
pub(crate) mod symbol;

pub use dynsym::{DynSym, DynSymbols};
pub use error::ImageError;
pub use image_file::{ImageFile, merge_windows};
pub use lookup::{LookupError, SymbolIndex, SymbolKind, SymbolMatch, find_symbol};
pub use symbol::{Binding, CloneKind, Function, FunctionKind, SymbolName, SymbolSource};

use object::Endianness;
use object::ReadRef;
use object::elf;
use object::read::elf::{Dyn, FileHeader, ProgramHeader, SectionHeader};
use std::path::{Path, PathBuf};

type Header = elf::FileHeader64<Endianness>;

/// What kind of ELF file an image is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageKind {
    /// `ET_EXEC`: a position-dependent executable, loaded at its link address.
    Executable,
    /// `ET_DYN` marked `DF_1_PIE` (or, from older linkers, with a
    /// `PT_INTERP` and no `DT_SONAME`): a position-independent executable.
    PieExecutable,
    /// Any other `ET_DYN`: a shared library (some, like libc.so.6, can
    /// also be run).
    SharedLibrary,
}

/// One loadable segment: where its bytes are in the file and in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub vaddr: u64,
    pub memsz: u64,
    pub offset: u64,
    pub filesz: u64,
    pub executable: bool,
}

/// A parsed x86-64 ELF image. Owns the file's bytes.
#[derive(Debug, Clone)]
pub struct Image {
    path: PathBuf,
    data: Vec<u8>,
    kind: ImageKind,
    build_id: Option<Vec<u8>>,
    soname: Option<String>,
    segments: Vec<Segment>,
    functions: Vec<Function>,
    padded_sites: Vec<u64>,
    code_ranges: Vec<std::ops::Range<u64>>,
}

impl Image {
    /// Read and parse the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Image, ImageError> {
        let path = path.as_ref();
        Image::parse(path, file::read_image(path)?)
    }

    /// Parse `data`, the contents of the file at `path` (used in messages).
    pub fn parse(path: impl AsRef<Path>, data: Vec<u8>) -> Result<Image, ImageError> {
        let path = path.as_ref().to_path_buf();
        let facts = Facts::read(&path, &*data, data.len() as u64)?;
        let corrupt = |what: String| ImageError::Corrupt {
            path: path.clone(),
            what,
        };
        let header = Header::parse(&*data).map_err(|e| corrupt(e.to_string()))?;
        let endian = header.endian().map_err(|e| corrupt(e.to_string()))?;
        let sections = header
            .sections(endian, &*data)
            .map_err(|e| corrupt(e.to_string()))?;
        let segments = facts.segments;
        let mut functions = symbol::read_functions(endian, &*data, &sections, |_| true).map_err(corrupt)?;
        let padded_sites = padding::read_sites(endian, &*data, &sections).map_err(corrupt)?;
        // A function is only worth reporting if its entry is code we can see.
        functions.retain(|f| in_code(&segments, f.address));
        let code_ranges = read_code_ranges(endian, &sections, &segments);
        Ok(Image {
            path,
            data,
            kind: facts.kind,
            build_id: facts.build_id,
            soname: facts.soname,
            segments,
            functions,
            padded_sites,
            code_ranges,
        })
    }

    /// The path this image was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    pub fn kind(&self) -> ImageKind {
        self.kind
    }

    /// The GNU build-id note (`NT_GNU_BUILD_ID`), if the image has one.
    pub fn build_id(&self) -> Option<&[u8]> {
        self.build_id.as_deref()
    }

    /// The build-id as lowercase hex, as `file(1)` and `readelf -n` print it.
    pub fn build_id_hex(&self) -> Option<String> {
        self.build_id.as_deref().map(hex)
    }

    /// `DT_SONAME`, for shared libraries that declare one.
    pub fn soname(&self) -> Option<&str> {
        self.soname.as_deref()
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Functions (merged aliases), sorted by address.
    pub fn functions(&self) -> &[Function] {
        &self.functions
    }

    /// The function whose entry is exactly `address`.
    pub fn function_at(&self, address: u64) -> Option<&Function> {
        self.functions
            .binary_search_by_key(&address, |f| f.address)
            .ok()
            .map(|i| &self.functions[i])
    }

    /// Addresses from `__patchable_function_entries`: each is the first
    /// padding byte of a prepared function. Sorted, without duplicates.
    pub fn padded_sites(&self) -> &[u64] {
        &self.padded_sites
    }

    /// The contents of the first section named `name`, if it has file bytes.
    pub fn section_data(&self, name: &str) -> Option<&[u8]> {
        let data = &*self.data;
        let header = Header::parse(data).ok()?;
        let endian = header.endian().ok()?;
        let sections = header.sections(endian, data).ok()?;
        let (_, section) = sections.section_by_name(endian, name.as_bytes())?;
        section.data(endian, data).ok()
    }

    /// The file bytes backing `[address, address + len)`, if that whole
    /// range lies in one loadable segment's file image.
    pub fn bytes_at(&self, address: u64, len: u64) -> Option<&[u8]> {
        let range = self.file_range(address, len)?;
        self.data.get(range)
    }

    /// The file offsets backing `[address, address + len)`.
    pub fn file_range(&self, address: u64, len: u64) -> Option<std::ops::Range<usize>> {
        let end = address.checked_add(len)?;
        let seg = self
            .segments
            .iter()
            .find(|s| address >= s.vaddr && end <= s.vaddr.saturating_add(s.filesz))?;
        let start = usize::try_from(seg.offset + (address - seg.vaddr)).ok()?;
        Some(start..start.checked_add(usize::try_from(len).ok()?)?)
    }

    /// The end of the executable segment containing `address`: code bytes
    /// can be decoded from `address` up to here.
    pub fn code_end(&self, address: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| s.executable && address >= s.vaddr && address < s.vaddr.saturating_add(s.filesz))
            .map(|s| s.vaddr.saturating_add(s.filesz))
    }

    /// Every range of executable code with bytes in the file, sorted and
    /// disjoint: the executable sections (`SHF_EXECINSTR`) that lie in an
    /// executable segment, or the executable segments themselves when the
    /// section headers are stripped. Symbols cover only part of this in
    /// stripped code; scans for callers must read all of it.
    pub fn code_ranges(&self) -> &[std::ops::Range<u64>] {
        &self.code_ranges
    }

    /// The lowest `PT_LOAD` address, page-aligned down: the image's base
    /// before relocation. The load bias of a mapped copy is its mapped
    /// base minus this.
    pub fn link_base(&self) -> u64 {
        self.segments.iter().map(|s| s.vaddr & !0xfff).min().unwrap_or(0)
    }
}

/// Whether `address` lies in an executable segment: where a function
/// entry must be for the image to report it.
pub(crate) fn in_code(segments: &[Segment], address: u64) -> bool {
    segments
        .iter()
        .any(|s| s.executable && address >= s.vaddr && address < s.vaddr + s.memsz)
}

/// What the headers of an image say, read through any [`ReadRef`]: the
/// whole file in memory ([`Image`]) or ranges of an open file
/// ([`ImageFile`]).
pub(crate) struct Facts {
    pub kind: ImageKind,
    pub build_id: Option<Vec<u8>>,
    pub soname: Option<String>,
    pub segments: Vec<Segment>,
}

impl Facts {
    /// Check the identification, machine, type and segments of the `len`
    /// bytes of `data`, and read the build-id, soname and kind.
    pub fn read<'d, R: ReadRef<'d>>(path: &Path, data: R, len: u64) -> Result<Facts, ImageError> {
        let ident = data
            .read_bytes_at(0, len.min(16))
            .map_err(|()| ImageError::Corrupt {
                path: path.to_path_buf(),
                what: "the ELF identification cannot be read".into(),
            })?;
        error::check_ident(path, ident)?;
        let corrupt = |what: &str| ImageError::Corrupt {
            path: path.to_path_buf(),
            what: what.to_string(),
        };
        let header = Header::parse(data).map_err(|e| corrupt(&e.to_string()))?;
        let endian = header.endian().map_err(|e| corrupt(&e.to_string()))?;
        if header.e_machine(endian) != elf::EM_X86_64 {
            return Err(ImageError::WrongMachine {
                path: path.to_path_buf(),
                machine: error::machine_name(header.e_machine(endian)),
            });
        }
        let program_headers = header
            .program_headers(endian, data)
            .map_err(|e| corrupt(&e.to_string()))?;
        let has_interp = program_headers
            .iter()
            .any(|ph| ph.p_type(endian) == elf::PT_INTERP);
        let e_type = header.e_type(endian);
        if e_type != elf::ET_EXEC && e_type != elf::ET_DYN {
            return Err(ImageError::UnsupportedType {
                path: path.to_path_buf(),
                e_type,
            });
        }
        let segments: Vec<Segment> = program_headers
            .iter()
            .filter(|ph| ph.p_type(endian) == elf::PT_LOAD)
            .map(|ph| Segment {
                vaddr: ph.p_vaddr(endian),
                memsz: ph.p_memsz(endian),
                offset: ph.p_offset(endian),
                filesz: ph.p_filesz(endian),
                executable: ph.p_flags(endian) & elf::PF_X != 0,
            })
            .collect();
        for s in &segments {
            let in_file = s.offset.checked_add(s.filesz).is_some_and(|end| end <= len);
            if !in_file || s.vaddr.checked_add(s.memsz).is_none() {
                return Err(corrupt(&format!(
                    "segment at {:#x} (file offset {:#x}, {:#x} bytes) lies outside the file",
                    s.vaddr, s.offset, s.filesz
                )));
            }
            // The kernel refuses such a segment too (load_elf_binary).
            if s.filesz > s.memsz {
                return Err(corrupt(&format!(
                    "segment at {:#x} has more bytes in the file ({:#x}) than in memory ({:#x})",
                    s.vaddr, s.filesz, s.memsz
                )));
            }
        }
        let sections = header
            .sections(endian, data)
            .map_err(|e| corrupt(&e.to_string()))?;
        let build_id = read_build_id(endian, data, header, &sections);
        let soname = read_soname(endian, data, &sections);
        // A runnable library (libc.so.6 has a PT_INTERP) is still a library:
        // the linker marks a PIE with DF_1_PIE; without that flag, an
        // interpreter and no soname mean a PIE from an older linker.
        let kind = if e_type == elf::ET_EXEC {
            ImageKind::Executable
        } else if dynamic_value(endian, data, &sections, elf::DT_FLAGS_1)
            .is_some_and(|flags| flags & u64::from(elf::DF_1_PIE) != 0)
            || (has_interp && soname.is_none())
        {
            ImageKind::PieExecutable
        } else {
            ImageKind::SharedLibrary
        };
        Ok(Facts {
            kind,
            build_id,
            soname,
            segments,
        })
    }
}

/// See [`Image::code_ranges`].
pub(crate) fn read_code_ranges<'d, R: ReadRef<'d>>(
    endian: Endianness,
    sections: &object::read::elf::SectionTable<'d, Header, R>,
    segments: &[Segment],
) -> Vec<std::ops::Range<u64>> {
    let in_code_segment = |r: &std::ops::Range<u64>| {
        segments
            .iter()
            .any(|s| s.executable && r.start >= s.vaddr && r.end <= s.vaddr.saturating_add(s.filesz))
    };
    let mut ranges: Vec<std::ops::Range<u64>> = sections
        .iter()
        .filter(|s| {
            let flags = s.sh_flags(endian);
            flags & u64::from(elf::SHF_EXECINSTR) != 0
                && flags & u64::from(elf::SHF_ALLOC) != 0
                && s.sh_type(endian) != elf::SHT_NOBITS
        })
        .filter_map(|s| {
            let start = s.sh_addr(endian);
            Some(start..start.checked_add(s.sh_size(endian))?)
        })
        .filter(|r| !r.is_empty() && in_code_segment(r))
        .collect();
    if ranges.is_empty() {
        ranges = segments
            .iter()
            .filter(|s| s.executable && s.filesz > 0)
            .map(|s| s.vaddr..s.vaddr.saturating_add(s.filesz))
            .collect();
    }
    ranges.sort_by_key(|r| (r.start, r.end));
    // Overlapping sections (forged headers) are merged so no byte is read twice.
    let mut merged: Vec<std::ops::Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn read_build_id<'d, R: ReadRef<'d>>(
    endian: Endianness,
    data: R,
    header: &Header,
    sections: &object::read::elf::SectionTable<'d, Header, R>,
) -> Option<Vec<u8>> {
    let from_notes = |mut notes: object::read::elf::NoteIterator<'d, Header>| {
        while let Ok(Some(note)) = notes.next() {
            if note.name() == elf::ELF_NOTE_GNU && note.n_type(endian) == elf::NT_GNU_BUILD_ID {
                return Some(note.desc().to_vec());
            }
        }
        None
    };
    for section in sections.iter() {
        if let Ok(Some(notes)) = section.notes(endian, data)
            && let Some(id) = from_notes(notes)
        {
            return Some(id);
        }
    }
    // Section headers can be stripped; the note segment stays.
    for ph in header.program_headers(endian, data).ok()? {
        if let Ok(Some(notes)) = ph.notes(endian, data)
            && let Some(id) = from_notes(notes)
        {
            return Some(id);
        }
    }
    None
}

/// The value of the first `tag` entry of the dynamic section.
fn dynamic_value<'d, R: ReadRef<'d>>(
    endian: Endianness,
    data: R,
    sections: &object::read::elf::SectionTable<'d, Header, R>,
    tag: u32,
) -> Option<u64> {
    let (dynamic, _) = sections.dynamic(endian, data).ok()??;
    dynamic
        .iter()
        .find(|d| d.d_tag(endian) == u64::from(tag))
        .map(|d| d.d_val(endian))
}

fn read_soname<'d, R: ReadRef<'d>>(
    endian: Endianness,
    data: R,
    sections: &object::read::elf::SectionTable<'d, Header, R>,
) -> Option<String> {
    let (dynamic, link) = sections.dynamic(endian, data).ok()??;
    let strings = sections.strings(endian, data, link).ok()?;
    let entry = dynamic
        .iter()
        .find(|d| d.d_tag(endian) == u64::from(elf::DT_SONAME))?;
    let name = strings.get(u32::try_from(entry.d_val(endian)).ok()?).ok()?;
    Some(String::from_utf8_lossy(name).into_owned())
}
