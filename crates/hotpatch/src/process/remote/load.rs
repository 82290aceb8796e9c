//! Loading a library into the target *by content*: the target maps exactly
//! the bytes the tool read and checked, never a path it would resolve
//! itself.
//!
//! 1. `memfd_create` in the target (sealable; `MFD_EXEC` where the kernel
//!    knows it, so `vm.memfd_noexec` cannot refuse the mapping later);
//! 2. the tool takes the target's very descriptor with `pidfd_getfd` — it
//!    never reopens `/proc/PID/fd/N`, which would give root write access to
//!    whatever file the target put at that number meanwhile — checks that
//!    it is an empty sealable memfd of that name, fills it, seals it
//!    (no write, grow, shrink, or further seals), and reads it back;
//! 3. `dlopen("/proc/self/fd/N")` under a path no other object of the
//!    process has (the dynamic loader hands back an already loaded object
//!    for a name it knows, whatever the file now holds), then `close(N)`;
//! 4. the handle's link map must point into that memfd's mapping, at the
//!    `PT_DYNAMIC` of these bytes: otherwise the handle is some other
//!    object and the load is refused.
//!
//! This makes "what is checked is what runs" hold against a file swapped
//! after the check, a rebuilt patch at the same path, and a target in
//! another mount namespace (which need not see the file at all).

use super::{DynSymbols, Remote, Running};
use crate::process::ProcessError;
use crate::process::maps;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const MFD_CLOEXEC: u64 = 0x1;
const MFD_ALLOW_SEALING: u64 = 0x2;
const MFD_EXEC: u64 = 0x10;

/// A library loaded by content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedLibrary {
    /// `dlopen`'s handle (glibc: the object's `struct link_map`).
    pub handle: u64,
    /// The memfd's name, as `/proc/PID/maps` shows it after `/memfd:`.
    pub memfd: String,
    /// Its load bias (`l_addr`).
    pub bias: u64,
}

/// The path under which the target opens its descriptor `fd`, unique for
/// `nonce`: `/proc/self/fd` followed by one `/.` (a 1 bit) or `//` (a 0
/// bit) per bit of the nonce, then `/N`. The kernel resolves every such
/// path to the same descriptor; the dynamic loader compares names as
/// strings, so no object loaded earlier under another nonce can match.
pub fn unique_fd_path(fd: u64, nonce: u64) -> String {
    let mut path = String::from("/proc/self/fd");
    for bit in (0..64).rev() {
        path.push_str(if nonce >> bit & 1 == 1 { "/." } else { "//" });
    }
    path.push_str(&format!("/{fd}"));
    path
}

/// 64 bits from the kernel's random pool.
fn nonce() -> Result<u64, std::io::Error> {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// `pidfd_getfd(pidfd_open(pid), fd)`: a duplicate of the target's own
/// descriptor `fd` in this process.
fn take_descriptor(pid: i32, fd: u64) -> Result<OwnedFd, std::io::Error> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; no memory is passed.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `pidfd` is a descriptor the kernel just returned to us and
    // nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: pidfd_getfd takes two descriptors and flags (must be 0) and
    // returns a new descriptor or -1; no memory is passed.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd as i32, 0) };
    if got < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above, a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(got as i32) })
}

/// Take the target's descriptor `fd`, check it is the empty, unsealed
/// memfd called `name`, fill it with `bytes`, seal it, read it back.
fn fill_descriptor(pid: i32, fd: u64, name: &str, bytes: &[u8]) -> Result<(), ProcessError> {
    let mut file = std::fs::File::from(take_descriptor(pid, fd).map_err(|e| ProcessError::CallFailed {
        pid,
        what: format!("pidfd_getfd of the patch's memfd (descriptor {fd})"),
        detail: e.to_string(),
    })?);
    fill_and_seal(&mut file, name, bytes).map_err(|detail| ProcessError::CallFailed {
        pid,
        what: format!("filling the patch's memfd (descriptor {fd})"),
        detail,
    })
}

/// Check that `file` is the empty, unsealed memfd called `name`, fill it
/// with `bytes`, seal it, and read it back.
fn fill_and_seal(file: &mut std::fs::File, name: &str, bytes: &[u8]) -> Result<(), String> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(|e| format!("cannot read what the descriptor is: {e}"))?;
    let expected = format!("/memfd:{name} (deleted)");
    if link.as_os_str() != expected.as_str() {
        return Err(format!("the descriptor is {}, not {expected}", link.display()));
    }
    let meta = file.metadata().map_err(|e| format!("fstat: {e}"))?;
    if !meta.file_type().is_file() || meta.len() != 0 {
        return Err(format!("the memfd is not an empty file ({} bytes)", meta.len()));
    }
    // SAFETY: fcntl on a descriptor we own, with an integer command.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals != 0 {
        return Err(format!(
            "the memfd is not sealable or already sealed (F_GET_SEALS = {seals})"
        ));
    }
    file.write_all(bytes)
        .map_err(|e| format!("writing the patch: {e}"))?;
    let all = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl on a descriptor we own, with integer arguments.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, all) } != 0 {
        return Err(format!("sealing: {}", std::io::Error::last_os_error()));
    }
    let mut back = Vec::with_capacity(bytes.len());
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_to_end(&mut back))
        .map_err(|e| format!("reading the patch back: {e}"))?;
    if back != bytes {
        return Err("the sealed memfd does not hold the bytes written".into());
    }
    Ok(())
}

/// A load by content run as part of a program (see
/// [`crate::process::program`]): the program creates the memfd
/// ([`ContentLoad::memfd_name`], [`ContentLoad::memfd_flags`]) and waits;
/// the tool fills and seals it ([`ContentLoad::fill`]); the program writes
/// the descriptor's number after [`ContentLoad::path_prefix`], `dlopen`s
/// that path and closes the descriptor; the tool checks the handle
/// ([`Running::loaded`]). Steps 1–4 of this module's description.
#[derive(Debug)]
pub struct ContentLoad {
    syms: DynSymbols,
    name: String,
    nonce: u64,
}

/// `MFD_CLOEXEC | MFD_ALLOW_SEALING`, and `MFD_EXEC` where this kernel
/// knows it (the target runs on the same kernel).
fn memfd_flags() -> u64 {
    static FLAGS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *FLAGS.get_or_init(|| {
        let name = c"hotpatch-probe";
        let with_exec = MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_EXEC;
        // SAFETY: memfd_create reads the NUL-terminated name, which lives
        // for the whole call; the descriptor it returns is closed at once.
        let fd = unsafe { libc::syscall(libc::SYS_memfd_create, name.as_ptr(), with_exec as libc::c_uint) };
        if fd >= 0 {
            // SAFETY: a descriptor we just got and own.
            drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
            with_exec
        } else {
            MFD_CLOEXEC | MFD_ALLOW_SEALING
        }
    })
}

impl ContentLoad {
    /// For `bytes` (an ELF shared object); `label` goes into the memfd's
    /// name.
    pub fn new(pid: i32, bytes: &[u8], label: &str) -> Result<ContentLoad, ProcessError> {
        let failed = |detail: String| ProcessError::CallFailed {
            pid,
            what: "loading the patch".into(),
            detail,
        };
        let syms = DynSymbols::parse(bytes).map_err(failed)?;
        let nonce = nonce().map_err(|e| failed(format!("/dev/urandom: {e}")))?;
        let label: String = label
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(64)
            .collect();
        Ok(ContentLoad {
            syms,
            name: format!("hotpatch-patch-{label}-{nonce:016x}"),
            nonce,
        })
    }

    /// The memfd's name, NUL-terminated.
    pub fn memfd_name(&self) -> Vec<u8> {
        let mut b = self.name.as_bytes().to_vec();
        b.push(0);
        b
    }

    pub fn memfd_flags(&self) -> u64 {
        memfd_flags()
    }

    /// [`unique_fd_path`] up to the descriptor's number (the program
    /// appends it).
    pub fn path_prefix(&self) -> String {
        let mut p = unique_fd_path(0, self.nonce);
        p.pop();
        p
    }

    /// Take the target's descriptor `fd` (the memfd the program made),
    /// check it, fill it with `bytes`, seal it, read it back.
    pub fn fill(&self, pid: i32, fd: u64, bytes: &[u8]) -> Result<(), ProcessError> {
        fill_descriptor(pid, fd, &self.name, bytes)
    }
}

impl Running<'_> {
    /// Check that `handle` (what the program's `dlopen` returned) is the
    /// object loaded from `load`'s memfd; its load bias. Its symbols are
    /// then known to [`Remote::dlsym_many`] without remote calls.
    pub fn loaded(&mut self, load: ContentLoad, handle: u64) -> Result<LoadedLibrary, ProcessError> {
        let remote = self.remote_mut();
        let bias = remote
            .verify_loaded(handle, &load.name, &load.syms)
            .map_err(|detail| ProcessError::CallFailed {
                pid: remote.pid,
                what: "dlopen of the patch".into(),
                detail,
            })?;
        remote.loaded.insert(handle, (bias, load.syms));
        Ok(LoadedLibrary {
            handle,
            memfd: load.name,
            bias,
        })
    }
}

impl Remote {
    /// `dlsym(handle, name)` for every name, answered from the loaded
    /// file alone (no remote call); `None` if some name needs the target's
    /// `dlsym` (see [`Remote::dlsym_many`]).
    pub fn file_addresses(&self, handle: u64, names: &[&str]) -> Option<Vec<u64>> {
        let (bias, syms) = self.loaded.get(&handle)?;
        names.iter().map(|n| syms.dlsym_address(*bias, n)).collect()
    }

    /// The handle's link map must describe an object mapped from the memfd
    /// `name`, with these bytes' `PT_DYNAMIC` at `l_ld`; its load bias.
    fn verify_loaded(&self, handle: u64, name: &str, syms: &DynSymbols) -> Result<u64, String> {
        let head = self
            .mem
            .read(handle, 24)
            .map_err(|e| format!("reading the link map at {handle:#x}: {e}"))?;
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&head[8 * i..8 * i + 8]);
            u64::from_le_bytes(w)
        };
        let (l_addr, l_ld) = (word(0), word(2));
        let maps = crate::process::Process { pid: self.pid }
            .maps()
            .map_err(|e| e.to_string())?;
        let expected = format!("/memfd:{name}");
        let at_ld = maps.iter().find(|m| (m.start..m.end).contains(&l_ld));
        let ours = at_ld.is_some_and(|m| m.path.as_deref() == Some(expected.as_str()));
        let dynamic = syms.dynamic.map(|d| d.wrapping_add(l_addr));
        if !ours || dynamic != Some(l_ld) {
            return Err(format!(
                "the handle it returned ({handle:#x}, l_ld {l_ld:#x} in {}) is not the object loaded from {expected}",
                at_ld
                    .and_then(|m| m.path.clone())
                    .unwrap_or_else(|| "no mapping".into())
            ));
        }
        let first = maps::images(&maps, self.pid)
            .into_iter()
            .find(|i| i.path == expected)
            .map(|i| i.base);
        if first != Some(l_addr.wrapping_add(syms.link_base)) {
            return Err(format!(
                "the link map's load bias {l_addr:#x} does not match the memfd's mapping"
            ));
        }
        Ok(l_addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_paths_differ_by_nonce_and_resolve_to_the_descriptor() {
        let a = unique_fd_path(5, 0);
        let b = unique_fd_path(5, 1);
        let c = unique_fd_path(5, u64::MAX);
        assert_ne!(a, b);
        assert_ne!(b, c);
        assert!(a.starts_with("/proc/self/fd") && a.ends_with("/5"));
        assert!(a.len() < 200);
        // The kernel resolves such a path to the descriptor itself.
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        let fd = file.as_raw_fd() as u64;
        for nonce in [0, 1, 0xdead_beef_0bad_f00d, u64::MAX] {
            let via = std::fs::metadata(unique_fd_path(fd, nonce)).unwrap();
            let direct = file.metadata().unwrap();
            use std::os::unix::fs::MetadataExt;
            assert_eq!(
                (via.dev(), via.ino()),
                (direct.dev(), direct.ino()),
                "nonce {nonce:#x}"
            );
        }
    }
}
