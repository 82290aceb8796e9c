//! Opening the files the policy rests on (the I/O edge of [`super`]).
//!
//! A patch, a key, the keys directory or the policy file that someone
//! other than root (or the user running the tool) can write is refused:
//! whoever can write it decides what runs. Every check is made with
//! `fstat` on the open descriptor, never on the path (which may change
//! between the check and the read). Policy and key files, and the keys
//! directory, are opened with `O_NOFOLLOW`: a symbolic link is refused.
//! Key files are opened relative to the directory's descriptor.

use super::PolicyError;
use crate::image;
use crate::patchfile::PatchFile;
use std::fs::{File, Metadata};
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why `meta` (of a file or directory) may not be trusted by a tool
/// running with effective uid `euid`, if it may not.
pub(crate) fn writers_problem(uid: u32, mode: u32, euid: u32) -> Option<String> {
    if uid != 0 && uid != euid {
        return Some(format!(
            "it is owned by uid {uid} (only root{} may own it)",
            if euid == 0 {
                String::new()
            } else {
                format!(" or uid {euid}")
            }
        ));
    }
    let mode = mode & 0o7777;
    if mode & 0o022 != 0 {
        let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
            (true, true) => "its group and by others",
            (true, false) => "its group",
            _ => "others",
        };
        return Some(format!(
            "it is writable by {who} (mode {mode:04o}; it must be writable by its owner only)"
        ));
    }
    None
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn check(what: &'static str, path: &Path, meta: &Metadata) -> Result<(), PolicyError> {
    match writers_problem(meta.uid(), meta.mode(), euid()) {
        Some(why) => Err(PolicyError::Insecure {
            what,
            path: path.to_path_buf(),
            why,
        }),
        None => Ok(()),
    }
}

fn io(what: &'static str, path: &Path, error: std::io::Error) -> PolicyError {
    if error.raw_os_error() == Some(libc::ELOOP) {
        return PolicyError::Insecure {
            what,
            path: path.to_path_buf(),
            why: "it is a symbolic link (give the file itself)".into(),
        };
    }
    PolicyError::Io {
        what,
        path: path.to_path_buf(),
        error,
    }
}

/// The patch at `path`, read once (a regular file, see
/// [`image::file::open_regular`]), if nobody but root can write it.
pub fn read_patch(path: &Path) -> Result<PatchFile, PolicyError> {
    let (file, meta) = image::file::open_regular(path).map_err(PolicyError::Image)?;
    check("patch file", path, &meta)?;
    let bytes = image::file::read_open(path, file, &meta).map_err(PolicyError::Image)?;
    Ok(PatchFile::from_bytes(path, bytes))
}

/// Read a small regular file from an open descriptor, after the checks.
fn read_small(what: &'static str, path: &Path, file: File, limit: u64) -> Result<String, PolicyError> {
    let meta = file.metadata().map_err(|e| io(what, path, e))?;
    if !meta.file_type().is_file() {
        return Err(PolicyError::Insecure {
            what,
            path: path.to_path_buf(),
            why: "it is not a regular file".into(),
        });
    }
    check(what, path, &meta)?;
    if meta.len() > limit {
        return Err(PolicyError::Io {
            what,
            path: path.to_path_buf(),
            error: std::io::Error::other(format!("{} bytes, more than {limit}", meta.len())),
        });
    }
    let mut text = String::new();
    file.take(limit)
        .read_to_string(&mut text)
        .map_err(|e| io(what, path, e))?;
    Ok(text)
}

const NOFOLLOW: i32 = libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;

/// The text of the policy file at `path` (`Err` with `NotFound` if there
/// is none).
pub fn read_policy(path: &Path) -> Result<String, PolicyError> {
    let what = "policy file";
    let file = File::options()
        .read(true)
        .custom_flags(NOFOLLOW)
        .open(path)
        .map_err(|e| io(what, path, e))?;
    read_small(what, path, file, super::rules::MAX_POLICY_FILE)
}

/// The text of the private key file at `path` (for `sign`): besides the
/// checks of every trusted file, nobody but its owner may read it.
pub fn read_private_key(path: &Path) -> Result<String, PolicyError> {
    let what = "private key file";
    let file = File::options()
        .read(true)
        .custom_flags(NOFOLLOW)
        .open(path)
        .map_err(|e| io(what, path, e))?;
    let meta = file.metadata().map_err(|e| io(what, path, e))?;
    if meta.mode() & 0o077 != 0 {
        return Err(PolicyError::Insecure {
            what,
            path: path.to_path_buf(),
            why: format!(
                "it is readable by others (mode {:04o}; chmod 600 it, and make a new key if others could have read it)",
                meta.mode() & 0o7777
            ),
        });
    }
    read_small(what, path, file, super::key::MAX_KEY_FILE)
}

/// Every `*.pub` file of the keys directory `dir` (names starting with `.`
/// skipped), in name order: `(path, text)`.
pub fn read_keys_dir(dir: &Path) -> Result<Vec<(PathBuf, String)>, PolicyError> {
    use nix::fcntl::OFlag;
    let what = "keys directory";
    let fd: OwnedFd = nix::fcntl::open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| io(what, dir, std::io::Error::from(e)))?;
    let file = File::from(fd);
    let meta = file.metadata().map_err(|e| io(what, dir, e))?;
    check(what, dir, &meta)?;
    let mut listing = nix::dir::Dir::from_fd(OwnedFd::from(file)).map_err(|e| io(what, dir, e.into()))?;
    let mut names: Vec<std::ffi::CString> = Vec::new();
    for entry in listing.iter() {
        let entry = entry.map_err(|e| io(what, dir, e.into()))?;
        let name = entry.file_name();
        let bytes = name.to_bytes();
        if bytes.ends_with(b".pub") && !bytes.starts_with(b".") {
            names.push(name.to_owned());
        }
    }
    names.sort();
    let mut keys = Vec::new();
    for name in names {
        let path = dir.join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(
            name.to_bytes(),
        ));
        let fd = nix::fcntl::openat(
            &listing,
            name.as_c_str(),
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| io("key file", &path, e.into()))?;
        let text = read_small("key file", &path, File::from(fd), super::key::MAX_KEY_FILE)?;
        keys.push((path, text));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn who_may_write() {
        assert_eq!(writers_problem(0, 0o100644, 0), None);
        assert_eq!(writers_problem(0, 0o100600, 1000), None);
        assert_eq!(writers_problem(1000, 0o100644, 1000), None);
        assert_eq!(writers_problem(0, 0o40755, 0), None);
        let e = writers_problem(1000, 0o100644, 0).unwrap();
        assert!(e.contains("owned by uid 1000"), "{e}");
        let e = writers_problem(0, 0o100664, 0).unwrap();
        assert!(e.contains("writable by its group") && e.contains("0664"), "{e}");
        let e = writers_problem(0, 0o100646, 0).unwrap();
        assert!(e.contains("by others"), "{e}");
        let e = writers_problem(0, 0o41777, 0).unwrap();
        assert!(e.contains("its group and by others"), "{e}");
    }

    #[test]
    fn refuses_symlinks_and_writable_files() {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, "require_signature = true\n").unwrap();
        std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_policy(&policy).is_ok());
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(&policy, &link).unwrap();
        let e = read_policy(&link).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o664)).unwrap();
        let e = read_policy(&policy).unwrap_err().to_string();
        assert!(e.contains("writable by its group"), "{e}");
    }

    #[test]
    fn keys_dir_reads_only_pub_files_and_refuses_links() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::create_dir(&keys).unwrap();
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(keys.join("b.pub"), "B").unwrap();
        std::fs::write(keys.join("a.pub"), "A").unwrap();
        std::fs::write(keys.join("README"), "not a key").unwrap();
        std::fs::write(keys.join(".hidden.pub"), "no").unwrap();
        let found = read_keys_dir(&keys).unwrap();
        let texts: Vec<&str> = found.iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(texts, ["A", "B"]);
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), keys.join("c.pub")).unwrap();
        let e = read_keys_dir(&keys).unwrap_err().to_string();
        assert!(e.contains("c.pub") && e.contains("symbolic link"), "{e}");
        std::fs::remove_file(keys.join("c.pub")).unwrap();
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o775)).unwrap();
        let e = read_keys_dir(&keys).unwrap_err().to_string();
        assert!(e.contains("keys directory") && e.contains("group"), "{e}");
    }
}
