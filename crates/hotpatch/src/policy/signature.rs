//! Ed25519 signatures carried inside a patch library (pure).
//!
//! # Where the signature lives
//!
//! In one ELF note section, `.note.hotpatch.sig` (`SHT_NOTE`, no flags: it
//! is in no segment, so the dynamic loader never maps or reads it and
//! signing does not change how the library loads). The section holds one
//! note:
//!
//! ```text
//! namesz = 9, descsz = 104, type = NOTE_TYPE (0x48505331, "HPS1")
//! name   = "hotpatch\0" + 3 bytes of padding
//! desc   = version (u32 LE, 1) · reserved (u32, 0)
//!          · Ed25519 public key (32 bytes) · signature (64 bytes)
//! ```
//!
//! # What is signed
//!
//! The message is [`DOMAIN`] followed by the whole file with the 104
//! descriptor bytes zeroed. Every other byte of the file — ELF header,
//! section headers, the note's own header and name, anything appended — is
//! covered, so changing any one of them fails verification; the descriptor
//! itself is checked field by field (version, reserved zero, the key the
//! signature is checked against, the signature). A file that holds a
//! signature note no section lists is refused too: hiding the section (a
//! changed section header or name) does not make a signed file unsigned.
//!
//! # Writing it
//!
//! [`sign`] on an unsigned file appends the note, a copy of the section
//! name table with the new name added, and a new section header table (the
//! old one plus the note's header), then points the ELF header at it. The
//! program headers and everything they map stay byte for byte. On a signed
//! file it rewrites the descriptor in place: re-signing replaces the
//! signature.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use object::read::elf::{FileHeader, SectionHeader};
use object::{LittleEndian, elf};
use sha2::{Digest, Sha256};

/// The section holding the signature note.
pub const SECTION: &str = ".note.hotpatch.sig";
/// The note's owner name (with its NUL).
const NOTE_NAME: &[u8] = b"hotpatch\0";
/// The note's type: "HPS1".
pub const NOTE_TYPE: u32 = 0x4850_5331;
/// The signature format this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Prepended to the signed message, so a signature over a patch can never
/// be taken for a signature over anything else made with the same key.
pub const DOMAIN: &[u8] = b"hotpatch patch signature v1\0";

const DESC_SIZE: usize = 4 + 4 + 32 + 64;
/// The name, padded to 4.
const NAME_SIZE: usize = 12;
const NOTE_SIZE: usize = 12 + NAME_SIZE + DESC_SIZE;
/// Offset of the descriptor inside the note.
const DESC_OFFSET: usize = 12 + NAME_SIZE;

/// A short, stable name for a public key: the first 8 bytes of its
/// SHA-256, in hex.
pub fn fingerprint(key: &VerifyingKey) -> String {
    Sha256::digest(key.as_bytes())[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What is wrong with a file's signature (or with the file as something to
/// sign).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("not an ELF64 little-endian file with section headers ({0})")]
    NotElf(String),
    #[error("malformed {SECTION} section: {0}")]
    Malformed(String),
    #[error(
        "{SECTION}: signature format version {0} is not supported (this tool reads version {FORMAT_VERSION})"
    )]
    UnsupportedVersion(u32),
    #[error("two {SECTION} sections")]
    TwoSignatures,
    #[error(
        "the signature by key {fingerprint} does not match the file's contents (the file was changed after signing)"
    )]
    Mismatch { fingerprint: String },
}

/// A valid signature: the key that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    pub key: VerifyingKey,
}

impl Signed {
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.key)
    }
}

/// Verify the signature carried in `bytes`: `Ok(None)` if the file has no
/// signature section, `Ok(Some(_))` with the key that signed exactly these
/// bytes, or why the signature is not valid.
pub fn verify(bytes: &[u8]) -> Result<Option<Signed>, SignatureError> {
    let Some(desc) = find_descriptor(bytes)? else {
        // A signature note that no section lists: the section headers or
        // names were changed after signing (a file is not made unsigned by
        // hiding its signature).
        if contains(bytes, &note_header()) {
            return Err(SignatureError::Malformed(
                "the file holds a signature note that no section lists (its section headers were changed)"
                    .into(),
            ));
        }
        return Ok(None);
    };
    let d = &bytes[desc.clone()];
    let version = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
    if version != FORMAT_VERSION {
        return Err(SignatureError::UnsupportedVersion(version));
    }
    if d[4..8] != [0; 4] {
        return Err(SignatureError::Malformed("reserved bytes are not zero".into()));
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(&d[8..40]);
    let mut sig = [0u8; 64];
    sig.copy_from_slice(&d[40..104]);
    let key = VerifyingKey::from_bytes(&key)
        .map_err(|_| SignatureError::Malformed("the public key is not a valid Ed25519 point".into()))?;
    let message = message(bytes, desc);
    key.verify_strict(&message, &Signature::from_bytes(&sig))
        .map_err(|_| SignatureError::Mismatch {
            fingerprint: fingerprint(&key),
        })?;
    Ok(Some(Signed { key }))
}

/// `bytes` signed with `key`: the signature note added (or, if the file is
/// already signed, its signature replaced).
pub fn sign(bytes: &[u8], key: &SigningKey) -> Result<Vec<u8>, SignatureError> {
    let (mut out, desc) = match find_descriptor(bytes)? {
        Some(desc) => (bytes.to_vec(), desc),
        None => add_note(bytes)?,
    };
    let d = &mut out[desc.clone()];
    d.fill(0);
    let message = message(&out, desc.clone());
    let signature = key.sign(&message);
    let d = &mut out[desc];
    d[0..4].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    d[8..40].copy_from_slice(key.verifying_key().as_bytes());
    d[40..104].copy_from_slice(&signature.to_bytes());
    Ok(out)
}

/// The note's header and name: how every signature note begins.
fn note_header() -> [u8; DESC_OFFSET] {
    let mut h = [0u8; DESC_OFFSET];
    h[0..4].copy_from_slice(&(NOTE_NAME.len() as u32).to_le_bytes());
    h[4..8].copy_from_slice(&(DESC_SIZE as u32).to_le_bytes());
    h[8..12].copy_from_slice(&NOTE_TYPE.to_le_bytes());
    h[12..12 + NOTE_NAME.len()].copy_from_slice(NOTE_NAME);
    h
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The signed message: the domain, then the file with `desc` zeroed.
fn message(bytes: &[u8], desc: std::ops::Range<usize>) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + bytes.len());
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(&bytes[..desc.start]);
    m.resize(m.len() + desc.len(), 0);
    m.extend_from_slice(&bytes[desc.end..]);
    m
}

type Header = elf::FileHeader64<LittleEndian>;

fn parse_header(bytes: &[u8]) -> Result<&Header, SignatureError> {
    let header = Header::parse(bytes).map_err(|e| SignatureError::NotElf(e.to_string()))?;
    if !header.is_little_endian() {
        return Err(SignatureError::NotElf("big-endian".into()));
    }
    Ok(header)
}

/// The byte range of the signature descriptor, if the file has the section.
fn find_descriptor(bytes: &[u8]) -> Result<Option<std::ops::Range<usize>>, SignatureError> {
    let header = parse_header(bytes)?;
    let endian = LittleEndian;
    let sections = header
        .sections(endian, bytes)
        .map_err(|e| SignatureError::NotElf(e.to_string()))?;
    let mut found = None;
    for section in sections.iter() {
        let name = sections
            .section_name(endian, section)
            .map_err(|e| SignatureError::NotElf(e.to_string()))?;
        if name != SECTION.as_bytes() {
            continue;
        }
        if found.is_some() {
            return Err(SignatureError::TwoSignatures);
        }
        if section.sh_type(endian) != elf::SHT_NOTE {
            return Err(SignatureError::Malformed("not a note section".into()));
        }
        if section.sh_flags(endian) != 0 {
            return Err(SignatureError::Malformed(
                "the section has flags (it must not be loaded)".into(),
            ));
        }
        let (offset, size) = section
            .file_range(endian)
            .ok_or_else(|| SignatureError::Malformed("the section has no bytes in the file".into()))?;
        if size != NOTE_SIZE as u64 {
            return Err(SignatureError::Malformed(format!(
                "{size} bytes, expected one note of {NOTE_SIZE}"
            )));
        }
        let start = usize::try_from(offset)
            .ok()
            .filter(|&o| o.checked_add(NOTE_SIZE).is_some_and(|end| end <= bytes.len()))
            .ok_or_else(|| SignatureError::Malformed("the section lies outside the file".into()))?;
        let note = &bytes[start..start + NOTE_SIZE];
        let word = |i: usize| u32::from_le_bytes([note[i], note[i + 1], note[i + 2], note[i + 3]]);
        if word(0) as usize != NOTE_NAME.len()
            || word(4) as usize != DESC_SIZE
            || word(8) != NOTE_TYPE
            || &note[12..12 + NOTE_NAME.len()] != NOTE_NAME
            || note[12 + NOTE_NAME.len()..DESC_OFFSET] != [0; NAME_SIZE - 9]
        {
            return Err(SignatureError::Malformed("not a hotpatch signature note".into()));
        }
        found = Some(start + DESC_OFFSET..start + NOTE_SIZE);
    }
    Ok(found)
}

/// `bytes` with an empty (zeroed) signature note section added, and the
/// descriptor's range.
fn add_note(bytes: &[u8]) -> Result<(Vec<u8>, std::ops::Range<usize>), SignatureError> {
    let header = parse_header(bytes)?;
    let endian = LittleEndian;
    let not_elf = |what: &str| SignatureError::NotElf(what.to_string());
    let shnum = header.e_shnum.get(endian) as usize;
    let shstrndx = header.e_shstrndx.get(endian) as usize;
    if header.e_shentsize.get(endian) as usize != size_of::<elf::SectionHeader64<LittleEndian>>() {
        return Err(not_elf("unexpected section header size"));
    }
    // Extended numbering (e_shnum 0, SHN_XINDEX) is for files with
    // 0xff00 sections or more: no patch library has that many.
    if shnum == 0 || shnum >= elf::SHN_LORESERVE as usize - 1 || shstrndx == 0 || shstrndx >= shnum {
        return Err(not_elf("no section headers, or extended section numbering"));
    }
    let sections = header
        .sections(endian, bytes)
        .map_err(|e| SignatureError::NotElf(e.to_string()))?;
    let strtab = sections
        .section(object::SectionIndex(shstrndx))
        .map_err(|e| SignatureError::NotElf(e.to_string()))?;
    let old_names = strtab
        .data(endian, bytes)
        .map_err(|e| SignatureError::NotElf(e.to_string()))?;

    let mut out = bytes.to_vec();
    // The note, 4-aligned.
    out.resize(out.len().next_multiple_of(4), 0);
    let note_at = out.len();
    out.extend_from_slice(&note_header());
    out.resize(note_at + NOTE_SIZE, 0);
    // The new section name table.
    let names_at = out.len();
    out.extend_from_slice(old_names);
    if old_names.last().is_some_and(|&b| b != 0) {
        out.push(0);
    }
    let name_index = out.len() - names_at;
    out.extend_from_slice(SECTION.as_bytes());
    out.push(0);
    let names_size = out.len() - names_at;
    // The new section header table, 8-aligned.
    out.resize(out.len().next_multiple_of(8), 0);
    let table_at = out.len();
    for (i, s) in sections.iter().enumerate() {
        let mut s = *s;
        if i == shstrndx {
            s.sh_offset.set(endian, names_at as u64);
            s.sh_size.set(endian, names_size as u64);
        }
        out.extend_from_slice(object::pod::bytes_of(&s));
    }
    let u32_of = |v: usize| object::U32::new(endian, v as u32);
    let u64_of = |v: usize| object::U64::new(endian, v as u64);
    let note_header = elf::SectionHeader64::<LittleEndian> {
        sh_name: u32_of(name_index),
        sh_type: u32_of(elf::SHT_NOTE as usize),
        sh_flags: u64_of(0),
        sh_addr: u64_of(0),
        sh_offset: u64_of(note_at),
        sh_size: u64_of(NOTE_SIZE),
        sh_link: u32_of(0),
        sh_info: u32_of(0),
        sh_addralign: u64_of(4),
        sh_entsize: u64_of(0),
    };
    out.extend_from_slice(object::pod::bytes_of(&note_header));
    // The ELF header points at the new table.
    let mut new_header = *header;
    new_header.e_shoff.set(endian, table_at as u64);
    new_header.e_shnum.set(endian, (shnum + 1) as u16);
    let h = object::pod::bytes_of(&new_header);
    out[..h.len()].copy_from_slice(h);
    Ok((out, note_at + DESC_OFFSET..note_at + NOTE_SIZE))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    /// A small ELF64 file with program headers, three sections (null,
    /// `.text`, `.shstrtab`) and some bytes after the section table, built
    /// by hand so the test needs no compiler.
    pub(crate) fn tiny_elf() -> Vec<u8> {
        let e = LittleEndian;
        let mut out = vec![0u8; 64];
        // One PT_LOAD program header at 64.
        let ph = elf::ProgramHeader64::<LittleEndian> {
            p_type: object::U32::new(e, elf::PT_LOAD),
            p_flags: object::U32::new(e, elf::PF_R | elf::PF_X),
            p_offset: object::U64::new(e, 0),
            p_vaddr: object::U64::new(e, 0),
            p_paddr: object::U64::new(e, 0),
            p_filesz: object::U64::new(e, 0x80),
            p_memsz: object::U64::new(e, 0x80),
            p_align: object::U64::new(e, 0x1000),
        };
        out.extend_from_slice(object::pod::bytes_of(&ph));
        let text_at = out.len();
        out.extend_from_slice(&[0x90, 0x90, 0xc3, 0xcc]);
        let names_at = out.len();
        let names = b"\0.text\0.shstrtab\0";
        out.extend_from_slice(names);
        out.resize(out.len().next_multiple_of(8), 0);
        let sh_at = out.len();
        let sh = |name: u32, ty: u32, flags: u64, offset: usize, size: usize| elf::SectionHeader64::<
            LittleEndian,
        > {
            sh_name: object::U32::new(e, name),
            sh_type: object::U32::new(e, ty),
            sh_flags: object::U64::new(e, flags),
            sh_addr: object::U64::new(e, offset as u64),
            sh_offset: object::U64::new(e, offset as u64),
            sh_size: object::U64::new(e, size as u64),
            sh_link: object::U32::new(e, 0),
            sh_info: object::U32::new(e, 0),
            sh_addralign: object::U64::new(e, 1),
            sh_entsize: object::U64::new(e, 0),
        };
        out.extend_from_slice(&[0u8; 64]);
        out.extend_from_slice(object::pod::bytes_of(&sh(
            1,
            elf::SHT_PROGBITS,
            (elf::SHF_ALLOC | elf::SHF_EXECINSTR) as u64,
            text_at,
            4,
        )));
        out.extend_from_slice(object::pod::bytes_of(&sh(
            7,
            elf::SHT_STRTAB,
            0,
            names_at,
            names.len(),
        )));
        out.extend_from_slice(b"trailing");
        let header = elf::FileHeader64::<LittleEndian> {
            e_ident: elf::Ident {
                magic: elf::ELFMAG,
                class: elf::ELFCLASS64,
                data: elf::ELFDATA2LSB,
                version: elf::EV_CURRENT,
                os_abi: 0,
                abi_version: 0,
                padding: [0; 7],
            },
            e_type: object::U16::new(e, elf::ET_DYN),
            e_machine: object::U16::new(e, elf::EM_X86_64),
            e_version: object::U32::new(e, elf::EV_CURRENT as u32),
            e_entry: object::U64::new(e, 0),
            e_phoff: object::U64::new(e, 64),
            e_shoff: object::U64::new(e, sh_at as u64),
            e_flags: object::U32::new(e, 0),
            e_ehsize: object::U16::new(e, 64),
            e_phentsize: object::U16::new(e, 56),
            e_phnum: object::U16::new(e, 1),
            e_shentsize: object::U16::new(e, 64),
            e_shnum: object::U16::new(e, 3),
            e_shstrndx: object::U16::new(e, 2),
        };
        out[..64].copy_from_slice(object::pod::bytes_of(&header));
        out
    }

    fn section_names(bytes: &[u8]) -> Vec<String> {
        let header = Header::parse(bytes).unwrap();
        let sections = header.sections(LittleEndian, bytes).unwrap();
        sections
            .iter()
            .map(|s| String::from_utf8_lossy(sections.section_name(LittleEndian, s).unwrap()).into_owned())
            .collect()
    }

    #[test]
    fn unsigned_file_has_no_signature() {
        assert_eq!(verify(&tiny_elf()), Ok(None));
    }

    #[test]
    fn round_trip() {
        let file = tiny_elf();
        let signed = sign(&file, &key(1)).unwrap();
        let found = verify(&signed).unwrap().unwrap();
        assert_eq!(found.key, key(1).verifying_key());
        assert_eq!(
            section_names(&signed),
            ["", ".text", ".shstrtab", SECTION],
            "the old sections keep their names"
        );
        // Everything that was in the file is still there, except the
        // three header fields that point at the new section table.
        assert_eq!(signed[64..file.len()], file[64..]);
        let h = |b: &[u8]| {
            let mut b = b[..64].to_vec();
            b[0x28..0x30].fill(0); // e_shoff
            b[0x3c..0x3e].fill(0); // e_shnum
            b
        };
        assert_eq!(h(&signed), h(&file));
    }

    #[test]
    fn resigning_replaces_the_signature() {
        let once = sign(&tiny_elf(), &key(1)).unwrap();
        let twice = sign(&once, &key(2)).unwrap();
        assert_eq!(once.len(), twice.len(), "no second note");
        assert_eq!(section_names(&twice).iter().filter(|n| *n == SECTION).count(), 1);
        assert_eq!(verify(&twice).unwrap().unwrap().key, key(2).verifying_key());
        // Signing again with the same key gives the same file (Ed25519 is
        // deterministic).
        assert_eq!(sign(&once, &key(1)).unwrap(), once);
    }

    #[test]
    fn one_byte_changed_anywhere_fails() {
        let signed = sign(&tiny_elf(), &key(1)).unwrap();
        let good = key(1).verifying_key();
        for offset in 0..signed.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut t = signed.clone();
                t[offset] ^= flip;
                // Never valid, and never taken for an unsigned file.
                match verify(&t) {
                    Err(_) => {}
                    Ok(None) => panic!("byte {offset} ^ {flip:#x}: looks unsigned"),
                    Ok(Some(s)) => panic!(
                        "byte {offset} ^ {flip:#x}: still verifies (key {})",
                        if s.key == good { "same" } else { "other" }
                    ),
                }
            }
        }
    }

    #[test]
    fn a_tampered_body_is_a_mismatch() {
        let mut signed = sign(&tiny_elf(), &key(1)).unwrap();
        signed[64 + 56] ^= 1; // the first byte of .text
        assert_eq!(
            verify(&signed),
            Err(SignatureError::Mismatch {
                fingerprint: fingerprint(&key(1).verifying_key())
            })
        );
    }

    #[test]
    fn truncated_or_extended_files_fail() {
        let signed = sign(&tiny_elf(), &key(1)).unwrap();
        let mut longer = signed.clone();
        longer.push(0);
        assert!(verify(&longer).is_err());
        for len in 0..signed.len() {
            assert!(
                !matches!(verify(&signed[..len]), Ok(Some(_))),
                "truncated to {len}"
            );
        }
    }

    #[test]
    fn not_elf_is_refused() {
        assert!(matches!(sign(b"hello", &key(1)), Err(SignatureError::NotElf(_))));
        assert!(matches!(verify(b"hello"), Err(SignatureError::NotElf(_))));
    }

    #[test]
    fn signing_a_compiled_library_keeps_its_loadable_contents() {
        // A real library: the tool's own test binary is an ELF executable
        // with many sections; signing must keep every section's bytes and
        // every program header.
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let signed = sign(&exe, &key(3)).unwrap();
        assert_eq!(verify(&signed).unwrap().unwrap().key, key(3).verifying_key());
        let a = object::read::elf::ElfFile64::<LittleEndian>::parse(&*exe).unwrap();
        let b = object::read::elf::ElfFile64::<LittleEndian>::parse(&*signed).unwrap();
        use object::{Object, ObjectSection, ObjectSegment};
        // The first segment maps the ELF header too; only e_shoff and
        // e_shnum (which the loader never reads) may differ.
        let segs = |f: &object::read::elf::ElfFile64<LittleEndian>| {
            f.segments()
                .map(|s| {
                    let mut data = s.data().unwrap().to_vec();
                    if s.file_range().0 == 0 && data.len() >= 64 {
                        data[0x28..0x30].fill(0);
                        data[0x3c..0x3e].fill(0);
                    }
                    (s.address(), s.file_range(), data)
                })
                .collect::<Vec<_>>()
        };
        assert!(segs(&a) == segs(&b), "a segment changed");
        for s in a.sections() {
            let t = b.section_by_name(s.name().unwrap()).unwrap();
            let (old, new) = (s.data().unwrap(), t.data().unwrap());
            if s.name() == Ok(".shstrtab") {
                assert!(new.starts_with(old), "section names changed");
            } else {
                assert!(old == new, "section {:?} changed", s.name());
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever is appended to a file (data the loader ignores), the
        /// signed file verifies, and changing any byte breaks it.
        #[test]
        fn any_file_round_trips(tail in proptest::collection::vec(any::<u8>(), 0..64), seed in any::<u8>(), at in any::<prop::sample::Index>(), flip in 1u8..) {
            let mut file = tiny_elf();
            file.extend_from_slice(&tail);
            let signed = sign(&file, &key(seed)).unwrap();
            prop_assert_eq!(verify(&signed).unwrap().unwrap().key, key(seed).verifying_key());
            let mut t = signed.clone();
            let i = at.index(t.len());
            t[i] ^= flip;
            prop_assert!(verify(&t).is_err());
        }

        /// Arbitrary bytes never panic the reader.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = verify(&bytes);
        }
    }
}
