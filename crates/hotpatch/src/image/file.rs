//! Reading a file the tool was pointed at, carefully: the tool runs as root
//! and a path may name a fifo (which would block forever), a device
//! (`/dev/zero` reads without end) or a file larger than any image.

use super::ImageError;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// The largest file read as an image or a patch (the biggest shared
/// libraries in distributions are a few hundred MiB).
pub const MAX_FILE_SIZE: u64 = 4 << 30;

/// The whole contents of the regular file at `path`.
///
/// Opened with `O_NONBLOCK` (a fifo cannot block the open) and
/// `O_NOCTTY`; anything but a regular file is refused by `fstat` on the
/// open descriptor (not on the path, which may change meanwhile), and so
/// is a file over [`MAX_FILE_SIZE`]. Reads exactly the size `fstat`
/// reported: a file that grows meanwhile is read as it was.
pub fn read_regular(path: &Path) -> Result<Vec<u8>, ImageError> {
    let (file, meta) = open_regular(path)?;
    read_open(path, file, &meta)
}

/// Like [`read_regular`], for a file that must be an ELF image: its
/// identification bytes are read and checked first, so a large file that
/// is no image (a shared mapping of `/dev/zero` seen through
/// `/proc/PID/map_files`, a data file) is refused after 16 bytes instead
/// of being read whole.
pub fn read_image(path: &Path) -> Result<Vec<u8>, ImageError> {
    let io = |error| ImageError::Io {
        path: path.to_path_buf(),
        error,
    };
    let (file, meta) = open_regular(path)?;
    let mut file = file.take(meta.len());
    let mut ident = Vec::with_capacity(16);
    (&mut file).take(16).read_to_end(&mut ident).map_err(io)?;
    super::error::check_ident(path, &ident)?;
    let mut data = Vec::with_capacity(meta.len() as usize);
    data.extend_from_slice(&ident);
    file.read_to_end(&mut data).map_err(io)?;
    Ok(data)
}

/// The regular file at `path`, opened as [`read_regular`] does, with its
/// `fstat`: for a caller that checks more (owner, mode) on the open
/// descriptor before reading it with [`read_open`].
pub fn open_regular(path: &Path) -> Result<(std::fs::File, std::fs::Metadata), ImageError> {
    let io = |error| ImageError::Io {
        path: path.to_path_buf(),
        error,
    };
    let file = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = kind_name(&kind);
        return Err(ImageError::NotRegular {
            path: path.to_path_buf(),
            what,
        });
    }
    if meta.len() > MAX_FILE_SIZE {
        return Err(ImageError::TooLarge {
            path: path.to_path_buf(),
            size: meta.len(),
        });
    }
    Ok((file, meta))
}

/// The contents of `file` (from [`open_regular`]), exactly the size `meta`
/// reported.
pub fn read_open(path: &Path, file: std::fs::File, meta: &std::fs::Metadata) -> Result<Vec<u8>, ImageError> {
    let mut data = Vec::with_capacity(meta.len() as usize);
    file.take(meta.len())
        .read_to_end(&mut data)
        .map_err(|error| ImageError::Io {
            path: path.to_path_buf(),
            error,
        })?;
    Ok(data)
}

/// What a file that is not a regular file is, for messages: "a fifo",
/// "a directory"…
pub fn kind_name(kind: &std::fs::FileType) -> &'static str {
    if kind.is_dir() {
        "a directory"
    } else if kind.is_symlink() {
        "a symbolic link"
    } else if kind.is_fifo() {
        "a fifo"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_devices_fifos_and_directories() {
        for (path, what) in [("/dev/zero", "a character device"), ("/", "a directory")] {
            match read_regular(Path::new(path)) {
                Err(ImageError::NotRegular { what: w, .. }) => assert_eq!(w, what, "{path}"),
                other => panic!("{path}: {other:?}"),
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Opening a fifo with no writer would block without O_NONBLOCK.
        match read_regular(&fifo) {
            Err(ImageError::NotRegular { what, .. }) => assert_eq!(what, "a fifo"),
            other => panic!("fifo: {other:?}"),
        }
    }

    #[test]
    fn reads_a_regular_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"\x7fELF and more").unwrap();
        assert_eq!(read_regular(&path).unwrap(), b"\x7fELF and more");
    }

    #[test]
    fn an_image_is_refused_on_its_first_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zeros");
        // Sparse: 1 GiB of zeros that a whole read would allocate.
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(1 << 30).unwrap();
        match read_image(&path) {
            Err(ImageError::NotElf { found, .. }) => assert!(found.contains("00 00 00 00"), "{found}"),
            other => panic!("{other:?}"),
        }
        let elf = dir.path().join("elf");
        std::fs::write(&elf, b"\x7fELF\x02\x01 and the rest of the file").unwrap();
        assert_eq!(
            read_image(&elf).unwrap(),
            b"\x7fELF\x02\x01 and the rest of the file"
        );
    }
}
