use std::path::PathBuf;

/// Why a process could not be read. Every variant names the pid.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("process {pid}: no such process")]
    NoSuchProcess { pid: i32 },
    #[error("process {pid}: permission denied reading {}: {hint}", path.display())]
    PermissionDenied { pid: i32, path: PathBuf, hint: String },
    #[error("process {pid}: cannot read {}: {source}", path.display())]
    Io {
        pid: i32,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("process {pid}: unexpected line {line} in /proc/{pid}/maps: {what}")]
    BadMaps { pid: i32, line: usize, what: String },
}

impl ProcessError {
    pub(crate) fn from_io(pid: i32, path: PathBuf, e: std::io::Error) -> ProcessError {
        match e.kind() {
            std::io::ErrorKind::NotFound => ProcessError::NoSuchProcess { pid },
            std::io::ErrorKind::PermissionDenied => ProcessError::PermissionDenied {
                pid,
                path,
                hint: permission_hint(),
            },
            _ => ProcessError::Io { pid, path, source: e },
        }
    }
}

/// What decides whether we may read another process, on this machine.
pub fn permission_hint() -> String {
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse::<u8>().ok());
    let yama = match scope {
        Some(0) => "Yama ptrace_scope is 0 (classic: same uid suffices)".to_string(),
        Some(1) => "Yama ptrace_scope is 1 (only descendants, or with CAP_SYS_PTRACE)".to_string(),
        Some(2) => "Yama ptrace_scope is 2 (CAP_SYS_PTRACE required)".to_string(),
        Some(3) => "Yama ptrace_scope is 3 (ptrace disabled until reboot)".to_string(),
        _ => "no Yama LSM".to_string(),
    };
    format!("reading another process needs the same uid or CAP_SYS_PTRACE (run as root?); {yama}")
}
