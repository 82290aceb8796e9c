//! A priority lent to a target thread before it stopped (an early loan)
//! is given back when the tool dies before the program could: by the tool
//! itself on every path it lives through, by its guardian process when it
//! is killed.
//!
//! The "tool" here is this test binary run again as a child (the
//! `HOTPATCH_TEST_LOAN_TID` mode of `as_a_killed_tool`), so that it can be
//! killed without taking the test harness with it.

use hotpatch::process::priority::{EarlyLoan, policy_of};
use nix::libc;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "HOTPATCH_TEST_LOAN_TID";

/// A single-threaded target: `sleep`.
struct Target(std::process::Child);

impl Target {
    fn start() -> Target {
        Target(
            Command::new("sleep")
                .arg("600")
                .stdin(Stdio::null())
                .spawn()
                .expect("sleep"),
        )
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_policy(tid: i32, want: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if policy_of(tid) == Some(want) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

fn can_raise() -> bool {
    let boost = hotpatch::process::Boost::realtime();
    boost.active()
}

/// The child's part: lend, say so, and die by SIGKILL with the loan open.
#[test]
fn as_a_killed_tool() {
    let Some(tid) = std::env::var(CHILD_ENV).ok().and_then(|t| t.parse::<i32>().ok()) else {
        return; // run as the child only
    };
    // A lock held while the guardian is born (as the tool holds the
    // target's): once let go, it is free at once, the guardian holding no
    // copy of it.
    let lock_path = std::env::var("HOTPATCH_TEST_LOCK").expect("lock path");
    let flock = |f: &std::fs::File, op: libc::c_int| {
        // SAFETY: flock on a descriptor this frame owns.
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(f), op) == 0 }
    };
    let held = std::fs::File::create(&lock_path).expect("lock file");
    assert!(flock(&held, libc::LOCK_EX | libc::LOCK_NB));
    let loan = EarlyLoan::make(tid, tid);
    drop(held);
    let again = std::fs::File::open(&lock_path).expect("lock file");
    println!("lock free {}", flock(&again, libc::LOCK_EX | libc::LOCK_NB));
    println!("loan {}", loan.is_some());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    std::mem::forget(loan);
    // SAFETY: kill(2) on our own pid; nothing of ours is touched after.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}

#[test]
fn a_tool_killed_with_an_early_loan_open_has_it_given_back() {
    if std::env::var(CHILD_ENV).is_ok() || !can_raise() {
        eprintln!("no real-time priority here (not root?): nothing to test");
        return;
    }
    let target = Target::start();
    let tid = target.pid();
    assert_eq!(policy_of(tid), Some(libc::SCHED_OTHER));
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "as_a_killed_tool", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, tid.to_string())
        .env("HOTPATCH_TEST_LOCK", dir.path().join("lock"))
        .stdin(Stdio::null())
        .output()
        .expect("child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("loan true"), "the child made no loan: {stdout}");
    assert!(
        stdout.contains("lock free true"),
        "the guardian kept a copy of the tool's lock: {stdout}"
    );
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(libc::SIGKILL),
        "{out:?}"
    );
    // The child died with the thread raised; its guardian gives it back.
    assert!(
        wait_policy(tid, libc::SCHED_OTHER),
        "thread {tid} kept policy {:?} after the tool died",
        policy_of(tid)
    );
}

#[test]
fn a_loan_dropped_by_a_living_tool_is_given_back() {
    if std::env::var(CHILD_ENV).is_ok() || !can_raise() {
        eprintln!("no real-time priority here (not root?): nothing to test");
        return;
    }
    let target = Target::start();
    let tid = target.pid();
    let loan = EarlyLoan::make(tid, tid).expect("a loan");
    assert_eq!(policy_of(tid), Some(libc::SCHED_FIFO));
    drop(loan);
    assert_eq!(policy_of(tid), Some(libc::SCHED_OTHER));
    // A thread that is real-time already gets no loan, and keeps its
    // policy when nothing was lent.
    let fifo = Target::start();
    let st = Command::new("chrt")
        .args(["-f", "-p", "3", &fifo.pid().to_string()])
        .status()
        .expect("chrt");
    assert!(st.success());
    assert!(EarlyLoan::make(fifo.pid(), fifo.pid()).is_none());
    assert_eq!(policy_of(fifo.pid()), Some(libc::SCHED_FIFO));
}
