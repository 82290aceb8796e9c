//! Named pipes, for targets that block reading one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `mkfifo dir/name`.
pub fn mkfifo(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let out = Command::new("mkfifo").arg(&path).output().expect("run mkfifo");
    assert!(
        out.status.success(),
        "mkfifo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

/// Write `text` to a FIFO (the target holds it open for reading and
/// writing, so this never blocks).
pub fn write_fifo(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open fifo");
    f.write_all(text.as_bytes()).expect("write fifo");
}
