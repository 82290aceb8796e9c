//! A patch file read once: the bytes that are checked (records, signature)
//! are the bytes the target loads, never the path again.

use crate::image::{self, ImageError};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The contents of a patch file, with their SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchFile {
    path: PathBuf,
    bytes: Arc<[u8]>,
    sha256: [u8; 32],
}

impl PatchFile {
    /// Read the regular file at `path` (never a fifo or a device; see
    /// [`image::file::read_regular`]).
    pub fn read(path: &Path) -> Result<PatchFile, ImageError> {
        Ok(PatchFile::from_bytes(path, image::file::read_regular(path)?))
    }

    /// A patch whose bytes came from elsewhere; `path` names it in messages.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> PatchFile {
        let sha256 = Sha256::digest(&bytes).into();
        PatchFile {
            path: path.to_path_buf(),
            bytes: bytes.into(),
            sha256,
        }
    }

    /// The path it was read from (for messages and records only).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn sha256(&self) -> &[u8; 32] {
        &self.sha256
    }

    /// The SHA-256 in lower-case hex.
    pub fn sha256_hex(&self) -> String {
        self.sha256.iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_bytes() {
        let f = PatchFile::from_bytes(Path::new("x"), b"abc".to_vec());
        assert_eq!(
            f.sha256_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(f.bytes(), b"abc");
    }
}
