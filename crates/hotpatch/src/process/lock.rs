//! Locks that keep two tools apart: one per target process (held while a
//! tool changes it) and one per call region (held while a session uses
//! it). Each is an exclusive `flock` on a file, dropped by the kernel when
//! the tool dies.
//!
//! The files live in a directory nobody else can touch, found without
//! reading the environment (two tools with different `TMPDIR`s must still
//! exclude each other): `/run/hotpatch` for root, `/run/user/UID/hotpatch`
//! for another effective uid. The directory is created 0700 and opened
//! `O_DIRECTORY|O_NOFOLLOW`, then checked (owned by the effective uid, no
//! group or other write). Lock files are opened relative to it with
//! `O_CREAT|O_NOFOLLOW|O_NONBLOCK|O_CLOEXEC`, 0600 — a planted symbolic
//! link is never followed, a fifo never blocks — and checked (a regular
//! file owned by the effective uid) before the `flock`.
//!
//! Files are named after the process's pid and start time (which tells a
//! recycled pid from the process meant). Taking a process lock removes
//! the files of processes that no longer exist, each only once this tool
//! holds its `flock`: nobody can be using it then, and only a tool that
//! read the start time of a process since exited could open that name
//! again (it then works on an exited process, and fails).

use super::ProcessError;
use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{Mode, SFlag, fstat, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

/// The lock directory of effective uid `euid`.
pub fn dir_path(euid: u32) -> PathBuf {
    if euid == 0 {
        PathBuf::from("/run/hotpatch")
    } else {
        PathBuf::from(format!("/run/user/{euid}/hotpatch"))
    }
}

/// The name of the lock file of process `pid` started at `start`, or of
/// its call region at `region`.
pub fn file_name(pid: i32, start: u64, region: Option<u64>) -> String {
    match region {
        None => format!("{pid}-{start}.lock"),
        Some(base) => format!("{pid}-{start}-call-{base:x}.lock"),
    }
}

/// The pid and start time a lock file name is about.
pub fn parse_file_name(name: &str) -> Option<(i32, u64)> {
    let stem = name.strip_suffix(".lock")?;
    let stem = match stem.split_once("-call-") {
        Some((stem, base)) => {
            u64::from_str_radix(base, 16).ok()?;
            stem
        }
        None => stem,
    };
    let (pid, start) = stem.split_once('-')?;
    let pid: i32 = pid.parse().ok()?;
    (pid > 0).then_some((pid, start.parse().ok()?))
}

/// The start time (`/proc/PID/stat` field 22, clock ticks since boot) in
/// the text of a stat file.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The start time of process `pid`: an error if it cannot be read.
pub fn start_time(pid: i32) -> Result<u64, ProcessError> {
    let path = PathBuf::from(format!("/proc/{pid}/stat"));
    let stat = std::fs::read_to_string(&path).map_err(|e| ProcessError::from_io(pid, path.clone(), e))?;
    parse_start_time(&stat).ok_or_else(|| ProcessError::Lock {
        pid,
        path,
        what: "has no start time (field 22); without it a recycled pid cannot be told from the process"
            .into(),
    })
}

/// An exclusive lock, held until dropped (or the tool exits).
#[derive(Debug)]
pub struct Lock {
    _file: File,
    path: PathBuf,
}

impl Lock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What taking a lock found.
#[derive(Debug)]
pub enum Taken {
    Locked(Lock),
    /// Another tool holds it.
    Busy(PathBuf),
}

/// Lock process `pid` (after removing the lock files of processes that no
/// longer exist).
pub fn lock_process(pid: i32) -> Result<Taken, ProcessError> {
    let start = start_time(pid)?;
    let dir = LockDir::open(pid)?;
    dir.prune();
    dir.take(pid, &file_name(pid, start, None))
}

/// Lock the call region at `base` of process `pid`, started at `start`.
pub fn lock_region(pid: i32, start: u64, base: u64) -> Result<Taken, ProcessError> {
    let dir = LockDir::open(pid)?;
    dir.take(pid, &file_name(pid, start, Some(base)))
}

/// The open, checked lock directory.
struct LockDir {
    fd: OwnedFd,
    path: PathBuf,
    euid: u32,
}

fn errno_text(e: Errno) -> String {
    std::io::Error::from(e).to_string()
}

impl LockDir {
    /// Create (0700) if needed, open without following a link, check.
    fn open(pid: i32) -> Result<LockDir, ProcessError> {
        let euid = nix::unistd::geteuid().as_raw();
        let path = dir_path(euid);
        let fail = |what: String| ProcessError::Lock {
            pid,
            path: path.clone(),
            what,
        };
        let (parent, name) = match (path.parent(), path.file_name()) {
            (Some(p), Some(n)) => (p, n),
            _ => return Err(fail("is no directory path".into())),
        };
        let dir_flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
        let parent_fd = nix::fcntl::open(parent, dir_flags, Mode::empty())
            .map_err(|e| fail(format!("cannot open its parent: {}", errno_text(e))))?;
        match mkdirat(&parent_fd, name, Mode::S_IRWXU) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(fail(format!("cannot create it: {}", errno_text(e)))),
        }
        let fd = openat(&parent_fd, name, dir_flags, Mode::empty()).map_err(|e| {
            fail(match e {
                Errno::ELOOP | Errno::ENOTDIR => "is not a directory (a symbolic link?)".into(),
                e => format!("cannot open it: {}", errno_text(e)),
            })
        })?;
        let st = fstat(&fd).map_err(|e| fail(format!("cannot stat it: {}", errno_text(e))))?;
        if st.st_uid != euid || st.st_mode & 0o022 != 0 {
            return Err(fail(format!(
                "must be a directory owned by uid {euid} that no group or other user can write \
                 (it is owned by uid {} with mode {:o})",
                st.st_uid,
                st.st_mode & 0o7777
            )));
        }
        Ok(LockDir { fd, path, euid })
    }

    /// Open (creating it) and check the lock file `name`, then try to lock it.
    fn take(&self, pid: i32, name: &str) -> Result<Taken, ProcessError> {
        let path = self.path.join(name);
        let fail = |what: String| ProcessError::Lock {
            pid,
            path: path.clone(),
            what,
        };
        let flags = OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC | OFlag::O_RDWR;
        let fd = openat(&self.fd, name, flags, Mode::S_IRUSR | Mode::S_IWUSR).map_err(|e| {
            fail(match e {
                Errno::ELOOP => "is a symbolic link; not followed".into(),
                e => format!("cannot open it: {}", errno_text(e)),
            })
        })?;
        self.check_file(&fd).map_err(fail)?;
        let file = File::from(fd);
        match file.try_lock() {
            Ok(()) => Ok(Taken::Locked(Lock { _file: file, path })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(Taken::Busy(path)),
            Err(std::fs::TryLockError::Error(e)) => Err(fail(format!("cannot lock it: {e}"))),
        }
    }

    /// A regular file owned by the effective uid.
    fn check_file(&self, fd: &impl AsFd) -> Result<(), String> {
        let st = fstat(fd).map_err(|e| format!("cannot stat it: {}", errno_text(e)))?;
        let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
        if kind != SFlag::S_IFREG {
            return Err(format!("is not a regular file (mode {:o})", st.st_mode));
        }
        if st.st_uid != self.euid {
            return Err(format!("is owned by uid {}, not {}", st.st_uid, self.euid));
        }
        Ok(())
    }

    /// Remove the lock files of processes that no longer exist (each once
    /// it is locked here: nobody is using it). Best effort.
    fn prune(&self) {
        let entries = match nix::dir::Dir::openat(
            &self.fd,
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(mut d) => d
                .iter()
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str().ok().map(str::to_string))
                .collect::<Vec<_>>(),
            Err(e) => {
                tracing::debug!(dir = %self.path.display(), "cannot list the lock directory: {e}");
                return;
            }
        };
        for name in entries {
            let Some((pid, start)) = parse_file_name(&name) else {
                continue;
            };
            if start_time(pid).is_ok_and(|s| s == start) {
                continue;
            }
            let flags = OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
            let Ok(fd) = openat(&self.fd, name.as_str(), flags, Mode::empty()) else {
                continue;
            };
            if self.check_file(&fd).is_err() {
                continue;
            }
            let file = File::from(fd);
            if file.try_lock().is_ok()
                && let Err(e) = unlinkat(&self.fd, name.as_str(), UnlinkatFlags::NoRemoveDir)
            {
                tracing::debug!(name, "cannot remove a stale lock file: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests that lock this test process run one at a time.
    fn serial() -> std::sync::MutexGuard<'static, ()> {
        static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        LOCK.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(file_name(42, 1234, None), "42-1234.lock");
        assert_eq!(
            file_name(42, 1234, Some(0x7f00_1000)),
            "42-1234-call-7f001000.lock"
        );
        assert_eq!(parse_file_name("42-1234.lock"), Some((42, 1234)));
        assert_eq!(parse_file_name("42-1234-call-7f001000.lock"), Some((42, 1234)));
        for bad in [
            "42.lock",
            "x-1.lock",
            "42-1234",
            "42-1234-call-zz.lock",
            "0-1.lock",
            "-1-2.lock",
        ] {
            assert_eq!(parse_file_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn start_time_is_field_22_even_after_an_odd_name() {
        let stat = "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_start_time(stat), Some(98765));
        assert_eq!(parse_start_time("1234 (x) S 1 2"), None);
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn directory_depends_on_the_uid_only() {
        assert_eq!(dir_path(0), Path::new("/run/hotpatch"));
        assert_eq!(dir_path(1000), Path::new("/run/user/1000/hotpatch"));
    }

    /// Lock files of processes that no longer exist (or whose pid now
    /// belongs to a process started later) go; live ones stay.
    #[test]
    fn taking_a_lock_prunes_the_files_of_exited_processes() {
        let _serial = serial();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id() as i32;
        child.wait().unwrap();
        let me = std::process::id() as i32;
        let my_start = start_time(me).unwrap();
        let dir = dir_path(nix::unistd::geteuid().as_raw());
        std::fs::create_dir_all(&dir).unwrap();
        let stale = [
            dir.join(file_name(gone, 7, None)),
            dir.join(file_name(gone, 7, Some(0x7f00_0000))),
            // This pid, but another start: a process before this one.
            dir.join(file_name(me, my_start + 1, None)),
        ];
        let live = dir.join(file_name(me, my_start, Some(0x1000)));
        for p in stale.iter().chain([&live]) {
            std::fs::write(p, b"").unwrap();
        }
        let Taken::Locked(lock) = lock_process(me).unwrap() else {
            panic!("lock held by someone else")
        };
        for p in &stale {
            assert!(!p.exists(), "{} not pruned", p.display());
        }
        assert!(live.exists(), "a live process's lock file was pruned");
        std::fs::remove_file(&live).unwrap();
        std::fs::remove_file(lock.path()).unwrap();
    }

    #[test]
    fn own_process_lock_excludes_a_second_taker() {
        let _serial = serial();
        let pid = std::process::id() as i32;
        let Taken::Locked(first) = lock_process(pid).unwrap() else {
            panic!("lock held by someone else")
        };
        // flock locks belong to the open file: a second open conflicts.
        match lock_process(pid).unwrap() {
            Taken::Busy(path) => assert_eq!(path, first.path()),
            Taken::Locked(_) => panic!("taken twice"),
        }
        let path = first.path().to_path_buf();
        drop(first);
        assert!(matches!(lock_process(pid).unwrap(), Taken::Locked(_)));
        std::fs::remove_file(path).unwrap();
    }
}
