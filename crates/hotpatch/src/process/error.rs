use std::path::PathBuf;

/// Why a process could not be read. Every variant names the pid.
#[derive(Debug, thiserror::Error)]
/// (Causes are fields named `error`, part of each message, not `source`s:
/// printing the chain would repeat them.)
pub enum ProcessError {
    #[error("process {pid}: no such process")]
    NoSuchProcess { pid: i32 },
    #[error("process {pid}: permission denied reading {}: {hint}", path.display())]
    PermissionDenied { pid: i32, path: PathBuf, hint: String },
    #[error("process {pid}: cannot read {}: {error}", path.display())]
    Io {
        pid: i32,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("process {pid}: unexpected line {line} in /proc/{pid}/maps: {what}")]
    BadMaps { pid: i32, line: usize, what: String },
    #[error("process {pid}: thread {tid} does not exist (it exited?)")]
    NoSuchThread { pid: i32, tid: i32 },
    #[error("process {pid}: no thread can run a remote call: {why}")]
    NoUsableThread { pid: i32, why: String },
    #[error("process {pid}, thread {tid}: ptrace not permitted: {hint}")]
    PtraceDenied { pid: i32, tid: i32, hint: String },
    #[error("process {pid}, thread {tid}: ptrace {op} failed: {error}")]
    Ptrace {
        pid: i32,
        tid: i32,
        op: &'static str,
        error: nix::Error,
    },
    #[error("process {pid}, thread {tid}: timed out after {after:?} {what}")]
    Timeout {
        pid: i32,
        tid: i32,
        what: String,
        after: std::time::Duration,
    },
    #[error("process {pid}, thread {tid}: exited {during}")]
    Exited { pid: i32, tid: i32, during: String },
    #[error("process {pid}: cannot {op} {len} bytes at {addr:#x} through /proc/{pid}/mem: {error}")]
    Mem {
        pid: i32,
        op: &'static str,
        addr: u64,
        len: usize,
        error: std::io::Error,
    },
    #[error("process {pid}: at {addr:#x} expected bytes {expected} but found {found}; nothing written")]
    Mismatch {
        pid: i32,
        addr: u64,
        expected: String,
        found: String,
    },
    #[error("process {pid}: wrote {len} bytes at {addr:#x} but read back {found}")]
    WriteNotVisible {
        pid: i32,
        addr: u64,
        len: usize,
        found: String,
    },
    #[error("process {pid}: {what} failed in the target: {detail}")]
    CallFailed { pid: i32, what: String, detail: String },
    #[error("process {pid}: no {:?} in {image}", crate::shorten::name(name))]
    SymbolNotFound { pid: i32, name: String, image: String },
    #[error("process {pid}: cannot read image {}: {error}", path.display())]
    Image {
        pid: i32,
        path: PathBuf,
        error: Box<crate::image::ImageError>,
    },
    #[error("process {pid}: {what}")]
    Unsupported { pid: i32, what: String },
    #[error("process {pid}: lock {}: {what}; nothing in the process changed", path.display())]
    Lock { pid: i32, path: PathBuf, what: String },
    #[error("process {pid} cannot be patched: {reasons}; nothing in it was changed")]
    NotPatchable { pid: i32, reasons: String },
    #[error("process {pid}: the remote session is unusable: {why}")]
    Poisoned { pid: i32, why: String },
}

impl ProcessError {
    pub(crate) fn from_io(pid: i32, path: PathBuf, e: std::io::Error) -> ProcessError {
        match e.kind() {
            std::io::ErrorKind::NotFound => ProcessError::NoSuchProcess { pid },
            std::io::ErrorKind::PermissionDenied => ProcessError::PermissionDenied {
                pid,
                path,
                hint: permission_hint(pid),
            },
            _ => ProcessError::Io { pid, path, error: e },
        }
    }
}

/// Why `PTRACE_SEIZE` of `tid` was refused: the capability, the Yama
/// setting, and any other tracer already attached.
pub fn ptrace_hint(pid: i32, tid: i32) -> String {
    let tracer = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("TracerPid:"))
                .and_then(|v| v.trim().parse::<i32>().ok())
        });
    match tracer {
        // The reason, whoever the tool runs as.
        Some(t) if t > 0 => {
            let comm = std::fs::read_to_string(format!("/proc/{t}/comm")).unwrap_or_default();
            format!(
                "already traced by pid {t} ({}): a thread has only one tracer at a time",
                super::preflight::printable(comm.trim_end_matches('\n'))
            )
        }
        Some(_) => format!("{}; no other tracer is attached", permission_hint(pid)),
        None => format!("{}; TracerPid unknown", permission_hint(pid)),
    }
}

/// Why reading or tracing process `pid` is refused, as far as this
/// machine tells: the tool's uid and CAP_SYS_PTRACE against the process's
/// uid, Yama's `ptrace_scope`, and what remains when those allow it (user
/// namespaces, an LSM).
pub fn permission_hint(pid: i32) -> String {
    let access = super::preflight::Access::of(pid);
    if let Some(why) = access.obstacle() {
        return why;
    }
    let yama = match access.yama {
        Some(s) => format!("Yama's ptrace_scope {s} allows that"),
        None => "there is no Yama".to_string(),
    };
    let who = if access.cap_sys_ptrace {
        format!("the tool runs as uid {} with CAP_SYS_PTRACE", access.euid)
    } else {
        format!("the tool runs as the process's uid {}", access.euid)
    };
    format!(
        "{who} and {yama}, so the refusal comes from {}",
        access.hidden_reasons()
    )
}
