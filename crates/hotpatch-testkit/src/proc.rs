//! Child processes of a test: killed and reaped on drop (pass or fail),
//! read with bounded waits, and commands that must succeed.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A generous bound for anything the tests wait for.
pub const WAIT: Duration = Duration::from_secs(30);

/// Tests of one binary that take this run one at a time: their busy
/// threads would otherwise compete for the machine's cores and slow each
/// other down.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A child process, killed and reaped on drop (pass or fail); its stdin is
/// a pipe and its stdout lines arrive on a channel.
pub struct Proc {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Every line read so far.
    pub seen: Vec<String>,
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            stdin: child.stdin.take(),
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The first new line matching `pred`, waiting at most `timeout`.
    pub fn try_line(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return Some(l);
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Like [`Proc::try_line`] with [`WAIT`], panicking with what was seen
    /// on a timeout.
    pub fn line(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        match self.try_line(WAIT, pred) {
            Some(l) => l,
            None => {
                let status = self.child.try_wait();
                panic!(
                    "process {} never printed {what} (status {status:?}); last lines: {:?}",
                    self.pid(),
                    self.seen.iter().rev().take(20).collect::<Vec<_>>()
                )
            }
        }
    }

    /// Collect the lines printed so far, without waiting.
    pub fn drain(&mut self) {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
    }

    /// Write `line` and a newline to the process's stdin.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("write {line:?} to process {}: {e}", self.child.id()));
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawn with piped output, read on threads (no pipe can fill up); the
/// closure returns (stdout, stderr) once the child has closed them.
pub fn spawn_piped(cmd: &mut Command) -> (Child, impl FnOnce() -> (String, String) + use<>) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    (child, move || {
        (out.join().unwrap_or_default(), err.join().unwrap_or_default())
    })
}

/// Run a command, panic with its stderr unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Stdout of a successful command, as text.
pub fn stdout_of(cmd: &mut Command) -> String {
    String::from_utf8(run_ok(cmd).stdout).expect("utf-8 output")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proc_is_killed_and_reaped_on_drop() {
        let mut p = Proc::spawn(Command::new("sh").args(["-c", "echo up; exec sleep 600"]));
        assert_eq!(p.line("up", |l| l == "up"), "up");
        let pid = p.pid();
        assert!(p.alive());
        drop(p);
        // Reaped: no zombie left behind under that pid.
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} still there after drop"
        );
    }

    #[test]
    fn try_line_gives_up_after_its_timeout() {
        let mut p = Proc::spawn(Command::new("sh").args(["-c", "echo one; echo two; exec sleep 600"]));
        assert_eq!(p.line("two", |l| l == "two"), "two");
        assert_eq!(p.try_line(Duration::from_millis(50), |l| l == "three"), None);
        assert_eq!(p.seen, ["one", "two"]);
    }
}
