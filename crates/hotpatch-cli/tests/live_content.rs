//! The target loads exactly the bytes the tool read and checked (issue 9,
//! "load by content"), never the file a path names at the moment of
//! `dlopen`:
//! - a patch rebuilt at the same path runs its new code (the dynamic
//!   loader would hand back the object it already has for that name);
//! - a file renamed over the patch's path the instant the tool has read it
//!   never gets its code run;
//! - a target in its own mount namespace, where the patch's path does not
//!   exist, is patched from the host's file.

#[path = "common/live.rs"]
mod live;

use live::*;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn start(dir: &Path) -> Target {
    let exe = build_target(dir, "gcc", "target", TARGET_C, &[]);
    Target::start(&exe, 2, None, Workers::Busy)
}

/// The patch SHA-256 each listed patch records.
fn listed_sha256(pid: i32) -> Vec<String> {
    list(pid)["patches"]
        .as_array()
        .expect("patches[]")
        .iter()
        .map(|p| p["sha256"].as_str().expect("sha256").to_string())
        .collect()
}

#[test]
fn a_patch_rebuilt_at_the_same_path_runs_its_new_code() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut t = start(dir.path());
    let fix = build_patch(dir.path(), "fix", PATCH_A_C);
    let first = apply(t.pid(), &fix, &[]);
    assert_eq!(t.version(), (1, 1));

    // Rebuilt in place: B's code at A's path supersedes A.
    assert_eq!(build_patch(dir.path(), "fix", PATCH_B_C), fix);
    let second = apply(t.pid(), &fix, &[]);
    // Each reports its trips into the target; only the first made the
    // call region (the bootstrap), the state region and scratch pages.
    let trips = |doc: &serde_json::Value| doc["remote_calls"].as_u64().expect("remote_calls");
    assert!(
        trips(&first) > trips(&second) && trips(&second) > 0,
        "first apply {} trips, second {}",
        trips(&first),
        trips(&second)
    );
    assert_eq!(
        t.version(),
        (2, 2),
        "the rebuilt patch must run, not the first build"
    );
    let shas = listed_sha256(t.pid());
    assert_eq!(shas.len(), 2);
    assert_ne!(shas[0], shas[1], "each apply records the bytes it loaded");

    // Everything reverted, rebuilt again, applied again: the newest build
    // runs. The revert reports its trips into the target like an apply.
    let reverted = revert_json(t.pid(), None);
    assert_eq!(t.version(), (0, 0));
    let restored = reverted["reverted"]
        .as_array()
        .expect("reverted[]")
        .iter()
        .any(|r| r["restored"].as_array().is_some_and(|r| !r.is_empty()));
    assert!(restored, "the revert restores the original code: {reverted}");
    assert!(
        reverted["remote_calls"].as_u64().is_some_and(|n| n >= 1),
        "a revert that restores functions reports its remote calls: {reverted}"
    );
    build_patch(dir.path(), "fix", PATCH_A_C);
    apply(t.pid(), &fix, &[]);
    assert_eq!(t.version(), (1, 1));
    assert!(t.proc.alive());
}

/// A library that must never run: its constructor leaves a mark, and its
/// replacements would make `f` and `g` return -1.
const EVIL_C: &str = r#"
#include "hotpatch.h"
#include <fcntl.h>
#include <unistd.h>
__attribute__((constructor)) static void mark(void) {
    int fd = open(MARK_PATH, O_CREAT | O_WRONLY, 0600);
    if (fd >= 0) close(fd);
}
long f_evil(long x) { (void)x; return -1; }
long g_evil(long x) { (void)x; return -1; }
HOTPATCH_REPLACE(f, f_evil);
HOTPATCH_REPLACE(g, g_evil);
"#;

/// Waits (up to `limit`) for the first time a process closes `file` after
/// reading it, then renames `with` over it. Returns whether it did.
fn swap_after_first_read(file: &Path, with: &Path, limit: Duration) -> std::thread::JoinHandle<bool> {
    let dir = file.parent().expect("parent").to_path_buf();
    let name = file.file_name().expect("name").to_owned();
    let with = with.to_path_buf();
    let file = file.to_path_buf();
    // SAFETY: inotify_init1 takes flags only.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    assert!(fd >= 0, "inotify_init1: {}", std::io::Error::last_os_error());
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).expect("path");
    // SAFETY: `c` is a valid NUL-terminated path; `fd` is our inotify descriptor.
    let wd = unsafe { libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_CLOSE_NOWRITE) };
    assert!(wd >= 0, "inotify_add_watch: {}", std::io::Error::last_os_error());
    std::thread::spawn(move || {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 4096];
        let swapped = 'wait: loop {
            if Instant::now() > deadline {
                break false;
            }
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            // SAFETY: `buf` is writable for its length.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            let mut at = 0usize;
            while n > 0 && at + 16 <= n as usize {
                // struct inotify_event { int wd; u32 mask, cookie, len; char name[]; }
                let len = u32::from_ne_bytes(buf[at + 12..at + 16].try_into().expect("4")) as usize;
                let raw = &buf[at + 16..(at + 16 + len).min(n as usize)];
                let event_name = raw.split(|&b| b == 0).next().unwrap_or(&[]);
                if event_name == name.as_bytes() {
                    std::fs::rename(&with, &file).expect("rename the other library over the patch");
                    break 'wait true;
                }
                at += 16 + len;
            }
        };
        // SAFETY: closing our own descriptor once.
        unsafe { libc::close(fd) };
        swapped
    })
}

#[test]
fn a_library_renamed_over_the_patch_after_the_check_never_runs() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut t = start(dir.path());
    let mark = dir.path().join("evil-ran");
    let evil_src = EVIL_C.replace("MARK_PATH", &format!("{:?}", mark.display().to_string()));
    let evil = build_patch(dir.path(), "evil", &evil_src);
    let fix = build_patch(dir.path(), "fix", PATCH_A_C);

    let swapper = swap_after_first_read(&fix, &evil, WAIT);
    let run = hotpatch(&[
        "apply".to_string(),
        t.pid().to_string(),
        fix.display().to_string(),
        "--json".to_string(),
    ]);
    assert!(swapper.join().expect("swapper"), "the swap never happened");
    assert_eq!(run.code(), 0, "apply: {}", run.failure());
    assert!(
        !mark.exists(),
        "the library renamed over the patch ran in the target"
    );
    assert_eq!(t.version(), (1, 1), "the target runs the patch the tool read");
    assert!(t.proc.alive());
}

#[test]
fn a_target_in_its_own_mount_namespace_is_patched_from_the_hosts_file() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = build_target(dir.path(), "gcc", "target", TARGET_C, &[]);
    let patches = dir.path().join("patches");
    std::fs::create_dir(&patches).expect("mkdir");
    let fix = build_patch(&patches, "fix", PATCH_A_C);
    // The target's namespace has an empty tmpfs where the patch is.
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount -t tmpfs tmpfs \"$0\" && exec \"$@\"")
        .arg(&patches)
        .arg(&exe);
    let mut t = Target::start_command(cmd, 2, None, Workers::Busy);
    let seen = Path::new(&format!("/proc/{}/root", t.pid())).join(fix.strip_prefix("/").expect("absolute"));
    assert!(
        !seen.exists(),
        "the patch must not exist in the target's namespace"
    );
    apply(t.pid(), &fix, &[]);
    assert_eq!(t.version(), (1, 1));
    revert(t.pid(), None);
    assert_eq!(t.version(), (0, 0));
}
