//! What a running target looks like, read straight from `/proc` (and
//! `readelf`), never through `hotpatch`: the tests' independent view.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// `len` bytes at `addr` of process `pid`, through `/proc/PID/mem`.
pub fn read_mem(pid: i32, addr: u64, len: usize) -> Vec<u8> {
    let file = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open /proc/PID/mem");
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, addr)
        .unwrap_or_else(|e| panic!("read {len} bytes at {addr:#x} of {pid}: {e}"));
    buf
}

/// Write `bytes` at `addr` of process `pid`, through `/proc/PID/mem`
/// (behind the tool's back).
pub fn write_mem(pid: i32, addr: u64, bytes: &[u8]) {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .expect("open /proc/PID/mem for writing");
    file.write_all_at(bytes, addr)
        .unwrap_or_else(|e| panic!("write {} bytes at {addr:#x} of {pid}: {e}", bytes.len()));
}

/// A function's 6 bytes of padding and first 8 bytes (entry nops or
/// endbr64 + nops, and what follows), for `-fpatchable-function-entry=8,6`.
pub fn code_bytes(pid: i32, entry: u64) -> Vec<u8> {
    read_mem(pid, entry - 6, 14)
}

/// `/proc/PID/maps`.
pub fn maps(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps")
}

/// Whether any mapping of `pid` is of `path`.
pub fn maps_file(pid: i32, path: &Path) -> bool {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let path = path.to_str().expect("utf-8 path");
    maps(pid).lines().any(|l| l.ends_with(path))
}

/// Threads of `pid` in a stopped state (`t` or `T` in `/proc/PID/task/*/stat`).
pub fn stopped_threads(pid: i32) -> Vec<(i32, char)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue; // the thread exited
        };
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .unwrap_or('?');
        if state == 't' || state == 'T' {
            let tid = e.file_name().to_string_lossy().parse().unwrap_or(0);
            out.push((tid, state));
        }
    }
    out
}

/// No thread of `pid` stays stopped (a thread may be caught between a
/// stop and its resume; give it 2 s to move on).
pub fn assert_no_thread_stopped(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let stopped = stopped_threads(pid);
        if stopped.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid}: threads left stopped: {stopped:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The value of `symbol` in the file `elf` (from `readelf -sW`); with
/// `file`, the one defined in that source file (`static` symbols).
pub fn symbol_value(elf: &Path, file: Option<&str>, symbol: &str) -> u64 {
    let text = String::from_utf8(
        Command::new("readelf")
            .arg("-sW")
            .arg(elf)
            .output()
            .expect("run readelf")
            .stdout,
    )
    .expect("utf-8");
    let mut current_file = String::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || !f[0].ends_with(':') {
            continue;
        }
        if f[3] == "FILE" {
            current_file = f[7].to_string();
            continue;
        }
        if f[7] == symbol && file.is_none_or(|w| w == current_file) {
            return u64::from_str_radix(f[1], 16).expect("hex value");
        }
    }
    panic!("{symbol} (file {file:?}) not in readelf -s {}", elf.display())
}

/// `symbol`'s address in process `pid`, which maps the executable `exe`
/// (see [`symbol_value`] for `file`).
pub fn symbol_in_process(pid: i32, exe: &Path, file: Option<&str>, symbol: &str) -> u64 {
    let value = symbol_value(exe, file, symbol);
    let exe = std::fs::canonicalize(exe).expect("canonical exe");
    let base = maps(pid)
        .lines()
        .find(|l| l.ends_with(exe.to_str().expect("utf-8")))
        .and_then(|l| l.split('-').next())
        .map(|s| u64::from_str_radix(s, 16).expect("hex"))
        .expect("exe mapped");
    base + value
}
