use object::elf;
use std::path::{Path, PathBuf};

/// Why a file could not be used as an image. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be read. The I/O error is part of the message,
    /// not a `source()`: printing the chain (`{:#}`) would repeat it.
    #[error("{}: {error}", path.display())]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{}: {what}, not a regular file; images and patches are read from regular files only", path.display())]
    NotRegular { path: PathBuf, what: &'static str },
    #[error("{}: {size} bytes, more than the {} bytes hotpatch reads as one image", path.display(), super::file::MAX_FILE_SIZE)]
    TooLarge { path: PathBuf, size: u64 },
    #[error("{}: not an ELF file ({found})", path.display())]
    NotElf { path: PathBuf, found: String },
    #[error("{}: 32-bit ELF (ELFCLASS32); hotpatch handles 64-bit x86-64 ELF only", path.display())]
    Elf32 { path: PathBuf },
    #[error("{}: big-endian ELF; hotpatch handles little-endian x86-64 ELF only", path.display())]
    BigEndian { path: PathBuf },
    #[error("{}: ELF for {machine}; hotpatch handles x86-64 only", path.display())]
    WrongMachine { path: PathBuf, machine: String },
    #[error("{}: ELF type {e_type} is neither an executable nor a shared library (a relocatable object or core file?)", path.display())]
    UnsupportedType { path: PathBuf, e_type: u16 },
    #[error("{}: corrupt or truncated ELF: {what}", path.display())]
    Corrupt { path: PathBuf, what: String },
}

impl ImageError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            ImageError::Io { path, .. }
            | ImageError::NotRegular { path, .. }
            | ImageError::TooLarge { path, .. }
            | ImageError::NotElf { path, .. }
            | ImageError::Elf32 { path }
            | ImageError::BigEndian { path }
            | ImageError::WrongMachine { path, .. }
            | ImageError::UnsupportedType { path, .. }
            | ImageError::Corrupt { path, .. } => path,
        }
    }
}

/// Check `e_ident` before handing the bytes to the parser, so the common
/// mistakes (wrong file, 32-bit build) get a precise message.
pub(super) fn check_ident(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    if data.len() < 4 || data[..4] != elf::ELFMAG {
        let found = if data.is_empty() {
            "the file is empty".to_string()
        } else if data.len() < 4 {
            format!("only {} bytes long", data.len())
        } else {
            format!(
                "starts with {:02x} {:02x} {:02x} {:02x}",
                data[0], data[1], data[2], data[3]
            )
        };
        return Err(ImageError::NotElf {
            path: path.to_path_buf(),
            found,
        });
    }
    match data.get(4) /* EI_CLASS */ {
        Some(&elf::ELFCLASS64) => {}
        Some(&elf::ELFCLASS32) => {
            return Err(ImageError::Elf32 {
                path: path.to_path_buf(),
            })
        }
        _ => {
            return Err(ImageError::Corrupt {
                path: path.to_path_buf(),
                what: "invalid ELF class in e_ident".to_string(),
            })
        }
    }
    match data.get(5) /* EI_DATA */ {
        Some(&elf::ELFDATA2LSB) => Ok(()),
        Some(&elf::ELFDATA2MSB) => Err(ImageError::BigEndian {
            path: path.to_path_buf(),
        }),
        _ => Err(ImageError::Corrupt {
            path: path.to_path_buf(),
            what: "invalid data encoding in e_ident".to_string(),
        }),
    }
}

pub(super) fn machine_name(machine: u16) -> String {
    let name = match machine {
        elf::EM_386 => "i386",
        elf::EM_ARM => "32-bit ARM",
        elf::EM_AARCH64 => "aarch64",
        elf::EM_RISCV => "RISC-V",
        elf::EM_PPC64 => "ppc64",
        elf::EM_S390 => "s390",
        elf::EM_MIPS => "MIPS",
        elf::EM_LOONGARCH => "LoongArch",
        _ => return format!("machine {machine}"),
    };
    name.to_string()
}
