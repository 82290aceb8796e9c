//! Reading and changing other processes. This is the impure edge: `/proc`
//! (maps, threads, memory), ptrace, and remote calls run inside a target on
//! one of its threads while the others keep running ([`remote`]).

mod error;
pub mod identity;
pub mod lock;
pub mod maps;
pub mod mem;
pub mod preflight;
pub mod priority;
pub mod program;
pub mod ptrace;
pub mod remote;
pub mod stop;
pub mod stub;
pub mod threads;

pub use error::{ProcessError, permission_hint, ptrace_hint};
pub use maps::{MapEntry, MappedImage};
pub use mem::Mem;
pub use priority::Boost;
pub use ptrace::Traced;
pub use remote::{CallOutcome, Placement, Remote, Running, Timeouts};
pub use stop::AllStopped;
pub use threads::{ThreadInfo, choose_thread, threads};

use std::path::PathBuf;

/// A process, named by its pid. Holds nothing open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Process {
    pid: i32,
}

impl Process {
    /// Check the process exists and its memory map can be read: opening
    /// `/proc/PID/maps` makes the kernel's ptrace-read access check; its
    /// text, which costs as much as it has mappings, is read by
    /// [`Process::maps`] alone.
    pub fn open(pid: i32) -> Result<Process, ProcessError> {
        if pid <= 0 {
            return Err(ProcessError::NoSuchProcess { pid });
        }
        let p = Process { pid };
        let path = p.proc_path("maps");
        std::fs::File::open(&path).map_err(|e| ProcessError::from_io(pid, path, e))?;
        Ok(p)
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// A path under `/proc/PID/`.
    pub fn proc_path(&self, rest: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/{rest}", self.pid))
    }

    fn read_proc(&self, rest: &str) -> Result<String, ProcessError> {
        let path = self.proc_path(rest);
        std::fs::read_to_string(&path).map_err(|e| ProcessError::from_io(self.pid, path, e))
    }

    /// The process's name (`comm`).
    pub fn name(&self) -> Result<String, ProcessError> {
        Ok(self.read_proc("comm")?.trim_end().to_string())
    }

    /// `/proc/PID/maps`, parsed. Its cost grows with the mappings (0.5 ms
    /// for 1,000, as 500 threads' stacks make): the trace log names each
    /// caller.
    #[track_caller]
    pub fn maps(&self) -> Result<Vec<MapEntry>, ProcessError> {
        tracing::trace!(pid = self.pid, at = %std::panic::Location::caller(), "reading maps");
        let text = self.read_proc("maps")?;
        maps::parse(&text).map_err(|(line, what)| ProcessError::BadMaps {
            pid: self.pid,
            line,
            what,
        })
    }

    /// Every file the process maps with an offset-0 mapping (each ELF image
    /// once), in address order, with a path to open it by.
    pub fn mapped_images(&self) -> Result<Vec<MappedImage>, ProcessError> {
        Ok(maps::images(&self.maps()?, self.pid))
    }
}
