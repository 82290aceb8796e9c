//! An image read in pieces: the headers when opened, then only the ranges
//! a question needs (a symbol table, a few code bytes). Planning a patch
//! of one function in a 100 MB library reads a few MB, not the file.
//!
//! The file is read with `pread` through the descriptor opened (and
//! checked: regular file, size) by [`super::file::open_regular`], never
//! memory-mapped: another process that can write the file could truncate
//! it while the tool reads, and a mapped page past the new end raises
//! SIGBUS in the tool (run as root, possibly mid-apply). With `pread` a
//! truncated file gives a short read, which is an error here like any
//! other.

use super::gnu_hash::GnuHash;
use super::lookup::{LookupError, Query, SymbolKind, SymbolMatch, pick};
use super::{Facts, Function, ImageError, ImageKind, Segment, file, hex, in_code, padding, symbol};
use object::elf;
use object::read::ReadCache;
use object::read::elf::{FileHeader, SectionHeader, SectionTable, Sym};
use object::{Endianness, ReadRef};
use std::cell::OnceCell;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

type Header = elf::FileHeader64<Endianness>;
type Sym64 = elf::Sym64<Endianness>;

/// An opened x86-64 ELF image whose headers were checked as
/// [`super::Image::parse`] checks them; everything else is read on demand.
#[derive(Debug)]
pub struct ImageFile {
    path: PathBuf,
    /// For whole-file reads ([`ImageFile::read_whole`]), with `pread`.
    file: std::fs::File,
    /// Ranges read so far (a duplicate of `file`'s descriptor).
    cache: ReadCache<std::fs::File>,
    len: u64,
    facts: Facts,
    /// The file in [`BLOCK`]-sized blocks, each read whole the first time
    /// [`ImageFile::bytes_at`] asks for bytes in it: the entries and
    /// padding of many functions near each other cost one read.
    blocks: Vec<OnceCell<Box<[u8]>>>,
}

/// The size of a block of [`ImageFile::bytes_at`]'s cache.
const BLOCK: u64 = 64 * 1024;

/// Reads the code of an [`ImageFile`] with `pread` (shareable between
/// threads, unlike the file's read cache).
#[derive(Debug, Clone, Copy)]
pub struct CodeReader<'a> {
    file: &'a std::fs::File,
    segments: &'a [Segment],
}

impl CodeReader<'_> {
    /// See [`ImageFile::read_code`].
    pub fn read(&self, address: u64, buf: &mut [u8]) -> bool {
        let Some(end) = address.checked_add(buf.len() as u64) else {
            return false;
        };
        let Some(seg) = self
            .segments
            .iter()
            .find(|s| address >= s.vaddr && end <= s.vaddr.saturating_add(s.filesz))
        else {
            return false;
        };
        self.file
            .read_exact_at(buf, seg.offset + (address - seg.vaddr))
            .is_ok()
    }
}

impl std::fmt::Debug for Facts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Facts")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl ImageFile {
    /// Open the regular file at `open_path` (named `path` in messages) and
    /// read its headers.
    pub fn open(path: impl AsRef<Path>, open_path: impl AsRef<Path>) -> Result<ImageFile, ImageError> {
        let path = path.as_ref().to_path_buf();
        let (file, meta) = file::open_regular(open_path.as_ref())?;
        let dup = file.try_clone().map_err(|error| ImageError::Io {
            path: path.clone(),
            error,
        })?;
        let cache = ReadCache::new(dup);
        let facts = Facts::read(&path, &cache, meta.len())?;
        let blocks = (0..meta.len().div_ceil(BLOCK)).map(|_| OnceCell::new()).collect();
        Ok(ImageFile {
            path,
            file,
            cache,
            len: meta.len(),
            facts,
            blocks,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn kind(&self) -> ImageKind {
        self.facts.kind
    }

    pub fn build_id_hex(&self) -> Option<String> {
        self.facts.build_id.as_deref().map(hex)
    }

    pub fn soname(&self) -> Option<&str> {
        self.facts.soname.as_deref()
    }

    pub fn segments(&self) -> &[Segment] {
        &self.facts.segments
    }

    /// See [`super::Image::link_base`].
    pub fn link_base(&self) -> u64 {
        self.facts
            .segments
            .iter()
            .map(|s| s.vaddr & !0xfff)
            .min()
            .unwrap_or(0)
    }

    /// See [`super::Image::bytes_at`].
    pub fn bytes_at(&self, address: u64, len: u64) -> Option<&[u8]> {
        let end = address.checked_add(len)?;
        let seg = self
            .facts
            .segments
            .iter()
            .find(|s| address >= s.vaddr && end <= s.vaddr.saturating_add(s.filesz))?;
        let offset = seg.offset + (address - seg.vaddr);
        match self.block_bytes(offset, len) {
            Some(bytes) => Some(bytes),
            None => (&self.cache).read_bytes_at(offset, len).ok(),
        }
    }

    /// `len` bytes at file `offset` if they lie in one block (read now if
    /// it was not yet).
    fn block_bytes(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let index = offset / BLOCK;
        if len == 0 || (offset + len - 1) / BLOCK != index {
            return None;
        }
        let cell = self.blocks.get(usize::try_from(index).ok()?)?;
        let block = match cell.get() {
            Some(b) => b,
            None => {
                let start = index * BLOCK;
                let mut data = vec![0; BLOCK.min(self.len - start) as usize];
                self.file.read_exact_at(&mut data, start).ok()?;
                let _ = cell.set(data.into_boxed_slice());
                cell.get()?
            }
        };
        let at = (offset - index * BLOCK) as usize;
        block.get(at..at + len as usize)
    }

    /// Fill `buf` with the file bytes at `address`, read directly (not
    /// kept): for scans of all the code. False if they are not all in one
    /// segment's file image or cannot be read.
    pub fn read_code(&self, address: u64, buf: &mut [u8]) -> bool {
        self.code_reader().read(address, buf)
    }

    /// [`ImageFile::read_code`] for several threads at once.
    pub fn code_reader(&self) -> CodeReader<'_> {
        CodeReader {
            file: &self.file,
            segments: &self.facts.segments,
        }
    }

    /// See [`super::Image::code_end`].
    pub fn code_end(&self, address: u64) -> Option<u64> {
        self.facts
            .segments
            .iter()
            .find(|s| s.executable && address >= s.vaddr && address < s.vaddr.saturating_add(s.filesz))
            .map(|s| s.vaddr.saturating_add(s.filesz))
    }

    /// The whole file, parsed as an [`super::Image`] (read through the same
    /// descriptor, so it is the file the headers came from).
    pub fn read_whole(&self) -> Result<super::Image, ImageError> {
        let mut data = vec![
            0;
            usize::try_from(self.len)
                .unwrap_or(usize::MAX)
                .min(file::MAX_FILE_SIZE as usize)
        ];
        self.file
            .read_exact_at(&mut data, 0)
            .map_err(|error| ImageError::Io {
                path: self.path.clone(),
                error,
            })?;
        super::Image::parse(&self.path, data)
    }

    fn corrupt(&self, what: impl std::fmt::Display) -> ImageError {
        ImageError::Corrupt {
            path: self.path.clone(),
            what: what.to_string(),
        }
    }

    fn sections(
        &self,
    ) -> Result<(Endianness, SectionTable<'_, Header, &ReadCache<std::fs::File>>), ImageError> {
        let data = &self.cache;
        let header = Header::parse(data).map_err(|e| self.corrupt(e))?;
        let endian = header.endian().map_err(|e| self.corrupt(e))?;
        let sections = header.sections(endian, data).map_err(|e| self.corrupt(e))?;
        Ok((endian, sections))
    }

    /// See [`super::Image::padded_sites`]; reads only that section (and,
    /// where its values are left to relocations, the relocations).
    pub fn padded_sites(&self) -> Result<Vec<u64>, ImageError> {
        let (endian, sections) = self.sections()?;
        padding::read_sites(endian, &self.cache, &sections).map_err(|e| self.corrupt(e))
    }

    /// The functions (as [`super::Image::functions`] has them) whose
    /// entries lie in `window`: their symbols' names are the only ones read.
    pub fn functions_in(&self, window: std::ops::Range<u64>) -> Result<Vec<Function>, ImageError> {
        let (endian, sections) = self.sections()?;
        let mut functions = symbol::read_functions(endian, &self.cache, &sections, |a| window.contains(&a))
            .map_err(|e| self.corrupt(e))?;
        functions.retain(|f| in_code(&self.facts.segments, f.address));
        Ok(functions)
    }

    /// [`ImageFile::functions_in`] for several windows at once, in one pass
    /// over the symbol tables: the functions whose entries lie in any of
    /// `windows`, sorted by address.
    pub fn functions_in_windows(
        &self,
        windows: &[std::ops::Range<u64>],
    ) -> Result<Vec<Function>, ImageError> {
        let merged = merge_windows(windows);
        let (endian, sections) = self.sections()?;
        let mut functions = symbol::read_functions(endian, &self.cache, &sections, |a| {
            let i = merged.partition_point(|w| w.end <= a);
            merged.get(i).is_some_and(|w| w.contains(&a))
        })
        .map_err(|e| self.corrupt(e))?;
        functions.retain(|f| in_code(&self.facts.segments, f.address));
        Ok(functions)
    }

    /// See [`super::Image::code_ranges`].
    pub fn code_ranges(&self) -> Result<Vec<std::ops::Range<u64>>, ImageError> {
        let (endian, sections) = self.sections()?;
        Ok(super::read_code_ranges(endian, &sections, &self.facts.segments))
    }

    /// The entries of [`super::Image::functions`], sorted, without reading
    /// or keeping their names (only whether they have one).
    pub fn function_entries(&self) -> Result<Vec<u64>, ImageError> {
        let (endian, sections) = self.sections()?;
        let mut entries = Vec::new();
        for sh_type in [elf::SHT_SYMTAB, elf::SHT_DYNSYM] {
            let table = sections
                .symbols(endian, &self.cache, sh_type)
                .map_err(|e| self.corrupt(e))?;
            if table.is_empty() {
                continue;
            }
            let strings: &[u8] = sections
                .section(table.string_section())
                .ok()
                .and_then(|s| s.data(endian, &self.cache).ok())
                .unwrap_or(&[]);
            for sym in table.symbols() {
                let address = sym.st_value(endian);
                if matches!(sym.st_type(), elf::STT_FUNC | elf::STT_GNU_IFUNC)
                    && sym.st_shndx(endian) != elf::SHN_UNDEF
                    && address != 0
                    && in_code(&self.facts.segments, address)
                    && has_name(strings, sym.st_name(endian) as usize)
                {
                    entries.push(address);
                }
            }
        }
        entries.sort_unstable();
        entries.dedup();
        Ok(entries)
    }

    /// The names of every defined function and variable symbol of
    /// `.symtab` and `.dynsym` (repeats and all), each table and its
    /// strings read whole: for the error path of a lookup.
    pub fn symbol_names(&self) -> Result<Vec<String>, ImageError> {
        let (endian, sections) = self.sections()?;
        let mut names = Vec::new();
        for sh_type in [elf::SHT_SYMTAB, elf::SHT_DYNSYM] {
            let Ok(table) = sections.symbols(endian, &self.cache, sh_type) else {
                continue;
            };
            let strings: &[u8] = sections
                .section(table.string_section())
                .ok()
                .and_then(|s| s.data(endian, &self.cache).ok())
                .unwrap_or(&[]);
            for sym in table.symbols() {
                let wanted = matches!(
                    sym.st_type(),
                    elf::STT_FUNC | elf::STT_GNU_IFUNC | elf::STT_OBJECT | elf::STT_TLS
                ) && sym.st_shndx(endian) != elf::SHN_UNDEF;
                if let Some(n) = wanted
                    .then(|| name_at(strings, sym.st_name(endian) as usize))
                    .flatten()
                {
                    names.push(n);
                }
            }
        }
        Ok(names)
    }

    /// The bytes of the section named `name`, read whole; `None` if the
    /// image has none, it cannot be read, or it is compressed.
    pub fn section_bytes(&self, name: &str) -> Option<&[u8]> {
        let (endian, sections) = self.sections().ok()?;
        let (_, section) = sections.section_by_name(endian, name.as_bytes())?;
        if section.sh_flags(endian) & u64::from(elf::SHF_COMPRESSED) != 0 {
            return None;
        }
        section.data(endian, &self.cache).ok()
    }

    /// The bytes of the `.gnu.hash` section, if the image has one.
    fn gnu_hash<'s>(
        &'s self,
        endian: Endianness,
        sections: &SectionTable<'s, Header, &'s ReadCache<std::fs::File>>,
    ) -> Option<&'s [u8]> {
        let section = sections.iter().find(|s| s.sh_type(endian) == elf::SHT_GNU_HASH)?;
        section.data(endian, &self.cache).ok()
    }

    /// Find each of `queries` as [`super::SymbolIndex::find`] does, with
    /// one pass over each symbol table for all of them and no name read,
    /// copied or demangled unless it may answer a query.
    pub fn find_symbols(
        &self,
        queries: &[&str],
    ) -> Result<Vec<Result<SymbolMatch, LookupError>>, ImageError> {
        let hits = self.symbols_named(queries)?;
        let image = self.path.display().to_string();
        Ok(queries
            .iter()
            .zip(hits)
            .map(|(q, h)| pick(&image, q, h.iter().collect()))
            .collect())
    }

    /// Every defined function and variable symbol each of `queries`
    /// names (as [`Self::find_symbols`] finds them, before one is picked),
    /// in table order, `.symtab` first: a symbol in both tables is there
    /// twice.
    pub fn symbols_named(&self, queries: &[&str]) -> Result<Vec<Vec<SymbolMatch>>, ImageError> {
        let (endian, sections) = self.sections()?;
        let parsed: Vec<Query<'_>> = queries.iter().map(|q| Query::parse(q)).collect();
        let mut hits: Vec<Vec<SymbolMatch>> = vec![Vec::new(); queries.len()];
        for sh_type in [elf::SHT_SYMTAB, elf::SHT_DYNSYM] {
            let Ok(table) = sections.symbols(endian, &self.cache, sh_type) else {
                continue;
            };
            if table.is_empty() {
                continue;
            }
            // Unreadable names are empty names, skipped as `symbols` skips them.
            let strings: &[u8] = sections
                .section(table.string_section())
                .ok()
                .and_then(|s| s.data(endian, &self.cache).ok())
                .unwrap_or(&[]);
            // `.dynsym` names equal to a query, from `.gnu.hash` where the
            // image has one (symbols below its first index are compared).
            let hashed = (sh_type == elf::SHT_DYNSYM)
                .then(|| self.gnu_hash(endian, &sections))
                .flatten();
            let equal: Vec<Option<Vec<usize>>> = parsed
                .iter()
                .map(|q| {
                    let table_hash = GnuHash::parse(hashed?)?;
                    let mut found = table_hash.find(endian, table.symbols(), strings, q.name.as_bytes())?;
                    let below = table.symbols().len().min(table_hash.symoffset() as usize);
                    found.extend((0..below).filter(|&i| {
                        strings
                            .get(table.symbols()[i].st_name(endian) as usize..)
                            .and_then(|rest| rest.strip_prefix(q.name.as_bytes()))
                            .is_some_and(|after| after.first() == Some(&0))
                    }));
                    found.sort_unstable();
                    Some(found)
                })
                .collect();
            scan_table(endian, table.symbols(), strings, &parsed, &equal, &mut hits);
        }
        Ok(hits)
    }
}

/// `windows` sorted and merged where they overlap or touch.
pub fn merge_windows(windows: &[std::ops::Range<u64>]) -> Vec<std::ops::Range<u64>> {
    let mut sorted: Vec<std::ops::Range<u64>> = windows.iter().filter(|w| w.start < w.end).cloned().collect();
    sorted.sort_by_key(|w| w.start);
    let mut out: Vec<std::ops::Range<u64>> = Vec::with_capacity(sorted.len());
    for w in sorted {
        match out.last_mut() {
            Some(last) if w.start <= last.end => last.end = last.end.max(w.end),
            _ => out.push(w),
        }
    }
    out
}

/// Up to this many queries, [`scan_table`] asks each query about each
/// symbol; above, it indexes the symbols the queries may match first.
const FEW_QUERIES: usize = 8;

/// Where a query's name may be in a string table: the offsets at which a
/// name equal to it starts, and the stretches of names that contain a piece
/// without which no name demangles to it.
struct Candidates {
    /// Offsets `p` with `strings[p..]` = name + NUL; `None`: every offset.
    equal: Option<Vec<usize>>,
    /// `(start of the name, offset)` of each occurrence of the needles;
    /// `None`: every name.
    contain: Option<Vec<(usize, usize)>>,
}

impl Candidates {
    /// `known_equal`: the caller has the symbols equal to `name` (from
    /// `.gnu.hash`), so the strings are not searched for them.
    /// `escapes`: the table's [`escapes`], found once for every query.
    fn of(strings: &[u8], name: &str, known_equal: bool, escapes: &[(usize, usize)]) -> Candidates {
        // A lossy name (U+FFFD) may come from invalid bytes, which no
        // search for the name's own bytes finds: such a query reads all.
        if name.contains('\u{fffd}') || name.contains('\0') {
            return Candidates {
                equal: None,
                contain: None,
            };
        }
        // Demangled Rust names: the last path component, when it is a plain
        // identifier, appears verbatim in the mangled name (legacy and v0
        // copy ASCII identifiers, v0 back-references point at earlier
        // text) unless a legacy `$uXX$` escape spelled part of it (as an
        // identifier character: other escapes make it no plain identifier).
        let last = name.rsplit("::").next().unwrap_or(name);
        let plain = !last.is_empty() && last.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        let occurrences: Option<Vec<usize>> =
            plain.then(|| memchr::memmem::find_iter(strings, last.as_bytes()).collect());
        let equal = match &occurrences {
            _ if known_equal => Vec::new(),
            // The name is its last component: its equal names are the
            // occurrences followed by the NUL ending a name (the search
            // finds occurrences that do not overlap: only for a name that
            // cannot overlap itself are they all).
            Some(found) if last.len() == name.len() && !overlaps_itself(name.as_bytes()) => found
                .iter()
                .copied()
                .filter(|&p| strings.get(p + name.len()) == Some(&0))
                .collect(),
            _ => {
                let mut pattern = name.as_bytes().to_vec();
                pattern.push(0);
                memchr::memmem::find_iter(strings, &pattern).collect()
            }
        };
        let contain = occurrences.map(|found| {
            let mut found: Vec<(usize, usize)> = found
                .into_iter()
                .map(|p| (memchr::memrchr(0, &strings[..p]).map_or(0, |z| z + 1), p))
                .collect();
            found.extend_from_slice(escapes);
            found.sort_unstable_by_key(|&(_, p)| p);
            found
        });
        Candidates {
            equal: Some(equal),
            contain,
        }
    }

    /// Whether the name at `offset` may answer the query (what
    /// [`offsets_that_may_match`] computes for all offsets at once).
    fn may_match(&self, offset: usize, known_equal: bool) -> bool {
        let equal = match &self.equal {
            None => return true,
            Some(e) => known_equal || e.binary_search(&offset).is_ok(),
        };
        equal
            || match &self.contain {
                None => true,
                // A name starting at `offset` contains the occurrence at
                // `p` iff the occurrence's name starts at or before it.
                // Names share tails, so several may start in one string.
                // The starts grow with the offsets: the first occurrence at
                // or after `offset` decides.
                Some(c) => c
                    .get(c.partition_point(|&(_, p)| p < offset))
                    .is_some_and(|&(start, _)| start <= offset),
            }
    }
}

/// The positions in `offsets` (sorted name offsets) of the names that
/// [`Candidates::may_match`] accepts without a known equal, for candidates
/// with both lists: the offsets equal to a name, and those whose name
/// contains an occurrence. A name at `o` contains the occurrence at `p`,
/// the first at or after `o`, iff that occurrence's name starts at or
/// before `o`. Positions may repeat.
fn offsets_that_may_match(equal: &[usize], contain: &[(usize, usize)], offsets: &[usize]) -> Vec<usize> {
    let mut out: Vec<usize> = equal
        .iter()
        .filter_map(|o| offsets.binary_search(o).ok())
        .collect();
    for (k, &(start, p)) in contain.iter().enumerate() {
        let low = match k {
            0 => start,
            _ => start.max(contain[k - 1].1 + 1),
        };
        let from = offsets.partition_point(|&o| o < low);
        let to = offsets.partition_point(|&o| o <= p);
        out.extend(from..to.max(from));
    }
    out
}

/// Whether two occurrences of `text` can overlap: some proper prefix is
/// also a suffix.
fn overlaps_itself(text: &[u8]) -> bool {
    (1..text.len()).any(|k| text[..k] == text[text.len() - k..])
}

/// The legacy Rust escapes `$uXX$` of an identifier character in
/// `strings`: (start of the name, offset) of each, by offset.
fn escapes(strings: &[u8]) -> Vec<(usize, usize)> {
    memchr::memmem::find_iter(strings, b"$u")
        .filter(|&p| escapes_identifier_char(&strings[p..]))
        .map(|p| (memchr::memrchr(0, &strings[..p]).map_or(0, |z| z + 1), p))
        .collect()
}

/// Whether `text` starts with a legacy Rust escape `$uXX$` that
/// `rustc_demangle` turns into an identifier character (a letter, digit
/// or `_`); rustc writes such escapes only for other characters.
fn escapes_identifier_char(text: &[u8]) -> bool {
    let Some(rest) = text.strip_prefix(b"$u") else {
        return false;
    };
    let digits = &rest[..rest
        .iter()
        .position(|&b| b == b'$' || b == 0)
        .unwrap_or(rest.len())];
    if rest.get(digits.len()) != Some(&b'$') || !digits.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return false;
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|d| u32::from_str_radix(d, 16).ok())
        .and_then(char::from_u32)
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The name at `offset` of `strings`, as [`super::lookup::symbols`] reads
/// it (`None` where that reads an empty name).
fn name_at(strings: &[u8], offset: usize) -> Option<String> {
    let rest = strings.get(offset..)?;
    let end = memchr::memchr(0, rest)?;
    (end > 0).then(|| String::from_utf8_lossy(&rest[..end]).into_owned())
}

/// Whether the name at `offset` is one [`name_at`] reads, without copying it.
fn has_name(strings: &[u8], offset: usize) -> bool {
    strings
        .get(offset..)
        .is_some_and(|rest| rest.first().is_some_and(|&b| b != 0) && memchr::memchr(0, rest).is_some())
}

/// Append to `hits[i]` every symbol of one table that answers `queries[i]`,
/// in table order: the symbols [`super::lookup::symbols`] lists for this
/// table, filtered as [`super::SymbolIndex::find`] filters them.
/// `equal[i]`, when known, lists the (sorted) indices of the symbols
/// whose name is `queries[i]`'s.
fn scan_table(
    endian: Endianness,
    symbols: &[Sym64],
    strings: &[u8],
    queries: &[Query<'_>],
    equal: &[Option<Vec<usize>>],
    hits: &mut [Vec<SymbolMatch>],
) {
    let escapes = escapes(strings);
    let candidates: Vec<Option<Candidates>> = queries
        .iter()
        .zip(equal)
        .map(|(q, e)| {
            q.address
                .is_none()
                .then(|| Candidates::of(strings, q.name, e.is_some(), &escapes))
        })
        .collect();
    // Which queries may match each symbol. For many queries, found from
    // the candidates once (not every query tried on every symbol): a name
    // offset's queries, a symbol index's (from `.gnu.hash`), an address's,
    // and those that may match any name. For a few, each query is asked
    // (no index over a big table for one name).
    let indexed = queries.len() > FEW_QUERIES;
    let considered = |sym: &Sym64| {
        matches!(
            sym.st_type(),
            elf::STT_FUNC | elf::STT_GNU_IFUNC | elf::STT_OBJECT | elf::STT_TLS
        ) && sym.st_shndx(endian) != elf::SHN_UNDEF
    };
    let mut offsets: Vec<usize> = symbols
        .iter()
        .filter(|s| indexed && considered(s))
        .map(|s| s.st_name(endian) as usize)
        .collect();
    offsets.sort_unstable();
    offsets.dedup();
    let mut by_offset: Vec<Vec<usize>> = vec![Vec::new(); offsets.len()];
    let mut by_index: std::collections::HashMap<usize, Vec<usize>> = std::collections::HashMap::new();
    let mut by_address: std::collections::HashMap<u64, Vec<usize>> = std::collections::HashMap::new();
    let mut always: Vec<usize> = Vec::new();
    for (qi, ((q, c), e)) in queries.iter().zip(&candidates).zip(equal).enumerate() {
        if !indexed {
            break;
        }
        match (q.address, c) {
            (Some(Some(address)), _) => by_address.entry(address).or_default().push(qi),
            (Some(None), _) => {}
            (
                None,
                Some(Candidates {
                    equal: Some(equal_at),
                    contain: Some(contain),
                }),
            ) => {
                for &i in e.iter().flatten() {
                    by_index.entry(i).or_default().push(qi);
                }
                for pos in offsets_that_may_match(equal_at, contain, &offsets) {
                    by_offset[pos].push(qi);
                }
            }
            (None, _) => always.push(qi),
        }
    }
    let mut file: Option<String> = None;
    let mut maybe: Vec<usize> = Vec::new();
    for (index, sym) in symbols.iter().enumerate() {
        let kind = match sym.st_type() {
            elf::STT_FILE => {
                file = name_at(strings, sym.st_name(endian) as usize);
                continue;
            }
            elf::STT_FUNC | elf::STT_GNU_IFUNC => SymbolKind::Function,
            elf::STT_OBJECT | elf::STT_TLS => SymbolKind::Variable,
            _ => continue,
        };
        if sym.st_shndx(endian) == elf::SHN_UNDEF {
            continue;
        }
        let offset = sym.st_name(endian) as usize;
        maybe.clear();
        if indexed {
            maybe.extend_from_slice(&always);
            if let Ok(pos) = offsets.binary_search(&offset) {
                maybe.extend_from_slice(&by_offset[pos]);
            }
            maybe.extend(by_index.get(&index).into_iter().flatten());
            maybe.extend(by_address.get(&sym.st_value(endian)).into_iter().flatten());
        } else {
            for (qi, ((q, c), e)) in queries.iter().zip(&candidates).zip(equal).enumerate() {
                let may = match (q.address, c) {
                    (Some(address), _) => address == Some(sym.st_value(endian)),
                    (None, Some(c)) => c.may_match(
                        offset,
                        e.as_ref().is_some_and(|e| e.binary_search(&index).is_ok()),
                    ),
                    (None, None) => true,
                };
                if may {
                    maybe.push(qi);
                }
            }
        }
        if maybe.is_empty() {
            continue;
        }
        maybe.sort_unstable();
        maybe.dedup();
        let mut name: Option<Option<String>> = None;
        for &qi in &maybe {
            let (q, out) = (&queries[qi], &mut hits[qi]);
            let Some(n) = name.get_or_insert_with(|| name_at(strings, offset)).as_deref() else {
                break;
            };
            if q.address.is_none() && !q.name_matches(n) {
                continue;
            }
            let global = sym.st_bind() != elf::STB_LOCAL;
            let m = SymbolMatch {
                name: n.to_string(),
                address: sym.st_value(endian),
                size: sym.st_size(endian),
                kind,
                file: if global { None } else { file.clone() },
                global,
            };
            if q.file_matches(&m) {
                out.push(m);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_that_overlap_themselves() {
        assert!(overlaps_itself(b"aa") && overlaps_itself(b"abcab"));
        assert!(!overlaps_itself(b"f_1") && !overlaps_itself(b"a") && !overlaps_itself(b"ab"));
        // An equal name inside an occurrence the search skips over.
        let strings = b"\0aaa\0";
        let c = Candidates::of(strings, "aa", false, &[]);
        assert_eq!(c.equal, Some(vec![2]));
    }

    #[test]
    fn windows_merge() {
        assert_eq!(
            merge_windows(&[10..20, 0..5, 15..30, 30..31, 40..40]),
            vec![0..5, 10..31]
        );
    }

    proptest! {
        /// The offsets found at once are exactly those `may_match` accepts
        /// one by one, for tables of names made of a few pieces.
        #[test]
        fn offsets_at_once_agree_with_may_match(
            names in proptest::collection::vec(
                proptest::collection::vec(prop_oneof![
                    Just("f_1"), Just("f_12"), Just("_"), Just("$u61$"), Just("ab"), Just("::"), Just("x"),
                ], 1..4).prop_map(|p| p.concat()),
                1..30,
            ),
            query in prop_oneof![Just("f_1"), Just("f_12"), Just("ab"), Just("x::f_1"), Just("a"), Just("_")],
            tail_starts in proptest::collection::vec(0usize..8, 0..10),
        ) {
            let mut strings = vec![0u8];
            let mut offsets = Vec::new();
            for n in &names {
                offsets.push(strings.len());
                strings.extend_from_slice(n.as_bytes());
                strings.push(0);
            }
            // Names that share a tail: offsets inside other names.
            for (i, &t) in tail_starts.iter().enumerate() {
                let o = offsets[i % offsets.len()];
                let end = o + strings[o..].iter().position(|&b| b == 0).unwrap_or(0);
                if o + t < end {
                    offsets.push(o + t);
                }
            }
            offsets.sort_unstable();
            offsets.dedup();
            let c = Candidates::of(&strings, query, false, &escapes(&strings));
            let (Some(equal), Some(contain)) = (&c.equal, &c.contain) else {
                return Ok(());
            };
            let mut at_once = offsets_that_may_match(equal, contain, &offsets);
            at_once.sort_unstable();
            at_once.dedup();
            let one_by_one: Vec<usize> = (0..offsets.len()).filter(|&i| c.may_match(offsets[i], false)).collect();
            prop_assert_eq!(at_once, one_by_one);
        }
    }
}
