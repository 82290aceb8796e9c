//! Remote calls against real processes (built with gcc at test time):
//! results, the other threads' view, system-call restarts, and survival of
//! the target when the tool is SIGKILLed at random moments.

use hotpatch::process::remote::REACH;
use hotpatch::process::{Mem, Placement, ProcessError, Remote, Timeouts, Traced, remote, threads};
use hotpatch_testkit::build::build_sources;
use hotpatch_testkit::fields::hex_field;
use hotpatch_testkit::oracle::assert_no_thread_stopped;
use hotpatch_testkit::proc::Proc;
use hotpatch_testkit::rng::XorShift;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const TARGET_C: &str = include_str!("remote_call/target.c");
const PLUGIN_C: &str = include_str!("remote_call/plugin.c");
/// The region-reuse test and the kill test do not run at the same time:
/// with the kill test's tools dying around it, the region-reuse test saw
/// its stuck call's region counted idle (2 regions removed, not 1) in 2 of
/// 6 paired runs; never alone (0 of 25, 0 of 12 under CPU load). Not
/// understood yet; see the issue notes.
static KILL_TEST: std::sync::Mutex<()> = std::sync::Mutex::new(());

const HELPER_ENV: &str = "HOTPATCH_REMOTE_CALL_HELPER_PID";
const PERSIST_ENV: &str = "HOTPATCH_REMOTE_CALL_PERSIST_PID";

struct Built {
    _dir: tempfile::TempDir,
    target: PathBuf,
    plugin: PathBuf,
}

fn build() -> Built {
    let dir = tempfile::tempdir().expect("tempdir");
    Built {
        target: build_sources(
            dir.path(),
            "gcc",
            "target",
            &[("target.c", TARGET_C)],
            &["-O2", "-march=native", "-pthread", "-rdynamic"],
        ),
        plugin: build_sources(
            dir.path(),
            "gcc",
            "plugin.so",
            &[("plugin.c", PLUGIN_C)],
            &["-O2", "-shared", "-fPIC"],
        ),
        _dir: dir,
    }
}

/// The running target and the addresses it reported.
struct Target {
    proc: Proc,
    flag: u64,
    errors: u64,
    iters: u64,
    compute: u64,
    tids: Vec<(String, i32)>,
}

fn start_target(built: &Built, busy_only: bool) -> Target {
    let mut cmd = Command::new(&built.target);
    if busy_only {
        cmd.arg("busy");
    }
    let mut proc = Proc::spawn(&mut cmd);
    let ready = proc
        .try_line(Duration::from_secs(10), |l| l.starts_with("ready "))
        .expect("target never said ready");
    let want = if busy_only { 3 } else { 8 };
    let deadline = Instant::now() + Duration::from_secs(10);
    while proc.seen.iter().filter(|l| l.starts_with("tid ")).count() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            proc.try_line(left, |l| l.starts_with("tid ")).is_some(),
            "threads did not start: {:?}",
            proc.seen
        );
    }
    let tids = proc
        .seen
        .iter()
        .filter_map(|l| {
            let mut w = l.split_whitespace().skip(1);
            Some((w.next()?.to_string(), w.next()?.parse().ok()?))
        })
        .collect();
    Target {
        flag: hex_field(&ready, "flag="),
        errors: hex_field(&ready, "errors="),
        iters: hex_field(&ready, "iters="),
        compute: hex_field(&ready, "compute="),
        tids,
        proc,
    }
}

impl Target {
    fn tid(&self, what: &str) -> Vec<i32> {
        self.tids
            .iter()
            .filter(|(w, _)| w == what)
            .map(|&(_, t)| t)
            .collect()
    }

    fn busy_errors(&self, mem: &Mem) -> u64 {
        mem.read_u64(self.errors).expect("read busy_errors")
    }

    fn busy_iters(&self, mem: &Mem) -> Vec<u64> {
        (0..4)
            .map(|k| mem.read_u64(self.iters + 8 * k).expect("read iters"))
            .collect()
    }

    /// The busy workers are all still making progress.
    fn assert_busy_progress(&self, mem: &Mem, workers: usize) {
        let before = self.busy_iters(mem);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.busy_iters(mem);
            if (0..workers).all(|k| now[k] > before[k]) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "busy threads stalled: {before:?} -> {now:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The reader thread, blocked in `read(0)` through everything before,
    /// gets `word` (its read was restarted, not failed).
    fn assert_read_restarted(&mut self, word: &str) {
        self.proc.send(word);
        let got = self
            .proc
            .try_line(Duration::from_secs(5), |l| l.starts_with("pipe-read"))
            .expect("reader never returned");
        assert_eq!(got, format!("pipe-read {} {word}", word.len() + 1));
    }

    /// Wait for two more sleeps of the sleeper thread; every sleep it
    /// reported so far must be full (see [`check_sleeps`]). Returns how
    /// many there were.
    fn two_more_full_sleeps(&mut self) -> usize {
        self.proc.drain();
        let slept = |seen: &[String]| seen.iter().filter(|l| l.starts_with("slept")).count();
        let before = slept(&self.proc.seen);
        let deadline = Instant::now() + Duration::from_secs(5);
        while slept(&self.proc.seen) < before + 2 {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                self.proc.try_line(left, |l| l.starts_with("slept")).is_some(),
                "sleeper stopped reporting"
            );
        }
        check_sleeps(&self.proc.seen)
    }

    /// SIGUSR1 wakes the futex and the epoll waiters; returns the epoll
    /// waiter's line.
    fn signal_waiters(&mut self) -> String {
        let pid = nix::unistd::Pid::from_raw(self.proc.pid());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1).expect("SIGUSR1");
        for what in ["cond-woke", "epoll-woke"] {
            if !self.proc.seen.iter().any(|l| l.starts_with(what)) {
                assert!(
                    self.proc
                        .try_line(Duration::from_secs(5), |l| l.starts_with(what))
                        .is_some(),
                    "{what} missing: {:?}",
                    self.proc.seen
                );
            }
        }
        self.proc
            .seen
            .iter()
            .find(|l| l.starts_with("epoll-woke"))
            .cloned()
            .expect("the epoll line just seen")
    }

    /// No thread is stopped (by us or anyone), and the process lives.
    fn assert_running(&mut self) {
        assert!(self.proc.alive(), "target died; output: {:?}", self.proc.seen);
        assert_no_thread_stopped(self.proc.pid());
    }
}

fn expected_compute(x: u64) -> u64 {
    x.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(x >> 7)
}

/// Sleeps the target reported; each must be the full 1.5 s.
fn check_sleeps(lines: &[String]) -> usize {
    let mut n = 0;
    for l in lines.iter().filter(|l| l.starts_with("slept ")) {
        let ns: u64 = l
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .expect("slept ns");
        assert!(l.ends_with("r=0 errno=0"), "nanosleep failed: {l}");
        assert!(ns >= 1_500_000_000, "nanosleep cut short: {l}");
        n += 1;
    }
    n
}

#[test]
fn remote_calls_in_a_multithreaded_target() {
    let t0 = Instant::now();
    let built = build();
    let mut target = start_target(&built, false);
    let pid = target.proc.pid();
    let mem = Mem::open(pid).expect("open mem");

    let mut remote = Remote::attach(pid, Placement::Near(target.compute)).expect("attach");
    let region = remote.region();
    assert!(region.start.abs_diff(target.compute) <= REACH && region.end.abs_diff(target.compute) <= REACH);
    let getpid = remote.libc_function("getpid").expect("getpid");
    let plugin = built.plugin.to_str().expect("utf-8 path");

    let mut handle = 0;
    let mut ran_on = std::collections::BTreeMap::<i32, usize>::new();
    for i in 0..50u64 {
        let out = remote.call_full(getpid, &[], 0).expect("getpid");
        assert_eq!(out.value, pid as u64, "getpid #{i}");
        *ran_on.entry(out.tid).or_default() += 1;
        assert_eq!(remote.syscall(39, &[]).expect("syscall getpid"), pid as i64);
        assert_eq!(
            remote.call(target.compute, &[i]).expect("compute"),
            expected_compute(i)
        );
        let h = remote.dlopen(plugin, 2 /* RTLD_NOW */).expect("dlopen");
        assert!(handle == 0 || handle == h, "dlopen gave another handle");
        handle = h;
        // The constructor ran exactly once.
        assert_eq!(mem.read_u32(target.flag).expect("flag"), 42);
        let answer = remote.dlsym(handle, "plugin_answer").expect("dlsym");
        assert_eq!(remote.call(answer, &[i, 9]).expect("plugin_answer"), i * 1000 + 9);
    }
    // A missing symbol reports dlerror's message.
    match remote.dlsym(handle, "no_such_symbol") {
        Err(ProcessError::CallFailed { detail, .. }) => {
            assert!(detail.contains("no_such_symbol"), "{detail}")
        }
        other => panic!("dlsym of a missing symbol: {other:?}"),
    }
    // Calls on each kind of thread: running workers, epoll_wait (EINTR for
    // the program, which retries), sigwait.
    for who in ["busy", "poller", "main", "sleeper", "waiter"] {
        for tid in target.tid(who) {
            remote.pin_thread(Some(tid));
            for i in 0..5u64 {
                let out = remote.call_full(target.compute, &[i], 0).expect("pinned call");
                assert_eq!(out.value, expected_compute(i));
                assert_eq!(out.tid, tid);
                *ran_on.entry(tid).or_default() += 1;
            }
        }
    }
    remote.pin_thread(None);
    assert!(ran_on.len() >= 8, "calls ran on {ran_on:?}");

    assert_eq!(target.busy_errors(&mem), 0, "a busy thread saw a wrong value");
    target.assert_busy_progress(&mem, 3);
    target.assert_running();

    // The reader's read(0) was restarted, not failed: it gets our bytes.
    target.assert_read_restarted("hello");
    // nanosleep sleeps its full time, every time: wait for sleeps that
    // started after the calls.
    let sleeps = target.two_more_full_sleeps();
    // The futex and epoll waiters still wake when signalled.
    let epoll = target.signal_waiters();
    assert!(epoll.starts_with("epoll-woke n=1 "), "{epoll}");

    // Still alive and correct.
    assert_eq!(remote.call(getpid, &[]).expect("getpid at the end"), pid as u64);
    assert_eq!(target.busy_errors(&mem), 0);
    target.assert_busy_progress(&mem, 3);
    target.assert_running();
    // The region goes away on release; the target does not notice.
    remote.release().expect("release");
    assert_region_gone(pid, &region);
    target.assert_busy_progress(&mem, 3);
    target.assert_running();
    eprintln!(
        "remote calls: ran on threads {ran_on:?}; {sleeps} full sleeps; {epoll}; {:.1?}",
        t0.elapsed()
    );
}

#[test]
fn remote_calls_interrupt_running_threads() {
    let built = build();
    let mut target = start_target(&built, true);
    let pid = target.proc.pid();
    let mem = Mem::open(pid).expect("open mem");
    let mut remote = Remote::attach(pid, Placement::Anywhere).expect("attach");
    let getpid = remote.libc_function("getpid").expect("getpid");
    for i in 0..50u64 {
        assert_eq!(remote.call(getpid, &[]).expect("getpid"), pid as u64);
        assert_eq!(
            remote.call(target.compute, &[i]).expect("compute"),
            expected_compute(i)
        );
    }
    // The one-shot form maps, calls and unmaps.
    let maps_before = hotpatch::process::Process::open(pid)
        .and_then(|p| p.maps())
        .expect("maps")
        .len();
    assert_eq!(
        hotpatch::process::remote::call(pid, getpid, &[]).expect("one-shot"),
        pid as u64
    );
    let maps_after = hotpatch::process::Process::open(pid)
        .and_then(|p| p.maps())
        .expect("maps")
        .len();
    assert_eq!(maps_before, maps_after, "one-shot call left a mapping");
    let plugin = built.plugin.to_str().expect("utf-8 path");
    remote.dlopen(plugin, 2).expect("dlopen on a busy thread");
    assert_eq!(mem.read_u32(target.flag).expect("flag"), 42);
    assert_eq!(target.busy_errors(&mem), 0, "a busy thread saw a wrong value");
    target.assert_busy_progress(&mem, 4);
    target.assert_running();
    let region = remote.region();
    remote.release().expect("release");
    assert_region_gone(pid, &region);
    assert_eq!(target.busy_errors(&mem), 0);
    target.assert_busy_progress(&mem, 4);
    target.assert_running();
}

fn assert_region_gone(pid: i32, region: &std::ops::Range<u64>) {
    let maps = hotpatch::process::Process::open(pid)
        .and_then(|p| p.maps())
        .expect("maps");
    assert!(
        !maps.iter().any(|m| m.start < region.end && region.start < m.end),
        "region {region:x?} still mapped"
    );
}

#[test]
fn errors_name_the_process_and_the_cause() {
    // Above the largest pid_max: never a process.
    let bogus = 0x3fff_fff0;
    match Remote::attach(bogus, Placement::Anywhere) {
        Err(e @ ProcessError::NoSuchProcess { .. }) => assert!(e.to_string().contains(&bogus.to_string())),
        other => panic!("attach to a missing process: {other:?}"),
    }

    let built = build();
    let mut target = start_target(&built, true);
    let pid = target.proc.pid();
    let mem = Mem::open(pid).expect("open mem");

    // A second tracer is refused, and told who holds the thread.
    let tid = target.tid("busy")[0];
    let guard = Traced::seize(pid, tid).expect("seize");
    let second = std::thread::spawn(move || Traced::seize(pid, tid).map(|_| ()))
        .join()
        .expect("join");
    match second {
        Err(ProcessError::PtraceDenied { pid: p, tid: t, hint }) => {
            assert_eq!((p, t), (pid, tid));
            assert!(hint.contains("already traced by pid"), "{hint}");
        }
        other => panic!("second tracer: {other:?}"),
    }
    // The guard detaches on drop, even from a running (never stopped) thread.
    drop(guard);
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).expect("status");
    assert!(status.contains("TracerPid:\t0"), "{status}");
    target.assert_running();

    // A call that never returns: a bounded timeout, then the session refuses
    // more calls; the target keeps running.
    let mut remote = Remote::attach_with(
        pid,
        Placement::Anywhere,
        Timeouts {
            stop: Duration::from_secs(2),
            call: Duration::from_millis(300),
        },
    )
    .expect("attach");
    match remote.syscall(34 /* pause */, &[]) {
        Err(e @ ProcessError::Timeout { .. }) => assert!(e.to_string().contains(&pid.to_string()), "{e}"),
        other => panic!("pause: {other:?}"),
    }
    assert!(matches!(
        remote.syscall(39, &[]),
        Err(ProcessError::Poisoned { .. })
    ));
    assert_eq!(target.busy_errors(&mem), 0);
    target.assert_running();

    // The process exits during a call.
    let mut remote = Remote::attach(pid, Placement::Anywhere).expect("attach");
    let exit = remote.libc_function("_exit").expect("_exit");
    match remote.call(exit, &[3]) {
        Err(ProcessError::Exited { pid: p, .. }) => assert_eq!(p, pid),
        other => panic!("_exit: {other:?}"),
    }
    let status = target.proc.child.wait().expect("reap target");
    assert_eq!(status.code(), Some(3));
}

/// A process stopped by SIGSTOP: the session cannot start, says why, and
/// leaves the process stopped and unchanged.
#[test]
fn a_stopped_process_is_named_and_left_stopped() {
    let built = build();
    let mut target = start_target(&built, true);
    let pid = target.proc.pid();
    let maps = || std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let before = maps();
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill {sig} {pid}");
    };
    signal("-STOP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !threads::threads(pid)
        .expect("threads")
        .iter()
        .all(|t| t.state == 'T')
    {
        assert!(Instant::now() < deadline, "the target never stopped");
        std::thread::sleep(Duration::from_millis(1));
    }
    let err = Remote::attach(pid, Placement::Anywhere).expect_err("a session with a stopped process");
    let msg = err.to_string();
    assert!(
        msg.contains("stopped by a signal") && msg.contains(&format!("kill -CONT {pid}")),
        "{msg}"
    );
    assert!(
        threads::threads(pid)
            .expect("threads")
            .iter()
            .all(|t| t.state == 'T'),
        "{msg}"
    );
    assert_eq!(maps(), before);
    signal("-CONT");
    target.assert_running();
}

/// A patch whose constructor never returns: `dlopen` times out saying so
/// and naming the thread now held inside the call; the target runs on.
#[test]
fn a_constructor_that_never_returns_is_named() {
    let built = build();
    let dir = built.target.parent().expect("build dir");
    std::fs::write(
        dir.join("hang.c"),
        "#include <unistd.h>\n__attribute__((constructor)) static void hang(void) { for (;;) pause(); }\n",
    )
    .expect("write hang.c");
    hotpatch_testkit::build::compile(
        "gcc",
        &["-O2", "-shared", "-fPIC", "-o", "hang.so", "hang.c"],
        dir,
    );
    let hang = dir.join("hang.so");
    let mut target = start_target(&built, true);
    let pid = target.proc.pid();
    let mut remote = Remote::attach_with(
        pid,
        Placement::Anywhere,
        Timeouts {
            stop: Duration::from_secs(2),
            call: Duration::from_millis(500),
        },
    )
    .expect("attach");
    let err = remote
        .dlopen(hang.to_str().expect("utf-8 path"), 2)
        .expect_err("dlopen of a constructor that never returns");
    let msg = err.to_string();
    let ProcessError::Timeout { tid, .. } = err else {
        panic!("not a timeout: {msg}");
    };
    assert!(msg.contains("hang.so") && msg.contains("constructors"), "{msg}");
    assert!(msg.contains(&format!("thread {tid} is held")), "{msg}");
    assert!(threads::thread_exists(pid, tid), "{msg}");
    target.assert_running();
}

/// Not a test by itself: a tool process that attaches to the pid in
/// `HOTPATCH_REMOTE_CALL_PERSIST_PID`, makes one call, prints its region
/// and exits normally (leaving the region for the next tool).
#[test]
#[ignore]
fn persist_helper_process() {
    let Some(pid) = std::env::var(PERSIST_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return;
    };
    let mut remote = Remote::attach(pid, Placement::Anywhere).expect("helper attach");
    let getpid = remote.libc_function("getpid").expect("getpid");
    assert_eq!(remote.call(getpid, &[]).expect("helper call"), pid as u64);
    let region = remote.region();
    println!(
        "region {:x} {:x} reused={}",
        region.start,
        region.end,
        remote.reused()
    );
}

/// Run [`persist_helper_process`] against `pid`: (region, reused).
fn persist_helper(pid: i32) -> (std::ops::Range<u64>, bool) {
    let exe = std::env::current_exe().expect("current exe");
    let out = Command::new(exe)
        .args([
            "persist_helper_process",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PERSIST_ENV, pid.to_string())
        .output()
        .expect("run helper");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "helper failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("region ").map(|(_, r)| r.to_string()))
        .unwrap_or_else(|| panic!("no region line: {stdout}"));
    let mut w = line.split_whitespace();
    let mut hex = || u64::from_str_radix(w.next().expect("field"), 16).expect("hex");
    let (start, end) = (hex(), hex());
    (start..end, line.ends_with("reused=true"))
}

#[test]
fn the_call_region_outlives_the_tool_and_is_reused() {
    let _apart = KILL_TEST.lock().unwrap_or_else(|e| e.into_inner());
    let built = build();
    let mut target = start_target(&built, false);
    let pid = target.proc.pid();
    let mem = Mem::open(pid).expect("open mem");
    // A first tool maps the region and exits; the next ones find it.
    let (first, reused) = persist_helper(pid);
    assert!(!reused, "a fresh target has no region to reuse");
    for _ in 0..3 {
        let (again, reused) = persist_helper(pid);
        assert_eq!(again, first, "a later tool mapped another region");
        assert!(reused);
    }
    assert_eq!(remote::regions(pid).expect("regions"), vec![first.clone()]);
    target.assert_running();

    // In this process too; the libc functions come from the region's record.
    let mut a = Remote::attach(pid, Placement::Anywhere).expect("attach a");
    assert_eq!(a.region(), first);
    assert!(a.reused());
    let getpid = a.libc_function("getpid").expect("getpid");
    assert_eq!(a.call(getpid, &[]).expect("getpid"), pid as u64);
    // dlsym_many: from the file where it can, through dlsym otherwise, the
    // same answers as dlsym.
    let plugin = built.plugin.to_str().expect("utf-8 path");
    let handle = a.dlopen(plugin, 2).expect("dlopen");
    let names = ["plugin_answer"];
    let many = a.dlsym_many(handle, &names).expect("dlsym_many");
    for (name, got) in names.iter().zip(&many) {
        assert_eq!(*got, a.dlsym(handle, name).expect("dlsym"), "{name}");
    }
    assert_eq!(a.call(many[0], &[7, 8]).expect("plugin_answer"), 7008);
    assert!(matches!(
        a.dlsym_many(handle, &["no_such_symbol"]),
        Err(ProcessError::CallFailed { .. })
    ));

    // While a session holds the region, another gets a region of its own.
    let mut b = Remote::attach(pid, Placement::Anywhere).expect("attach b");
    assert_ne!(b.region(), a.region());
    assert!(!b.reused());
    assert_eq!(b.call(getpid, &[]).expect("getpid on b"), pid as u64);
    assert_eq!(a.call(getpid, &[]).expect("getpid on a"), pid as u64);
    let second = b.region();
    drop(a);
    drop(b);
    let mut all = remote::regions(pid).expect("regions");
    all.sort_by_key(|r| r.start);
    let mut want = vec![first.clone(), second.clone()];
    want.sort_by_key(|r| r.start);
    assert_eq!(all, want);

    // A call that never returns: its region is not taken by later sessions.
    let mut stuck = Remote::attach_with(
        pid,
        Placement::Anywhere,
        Timeouts {
            stop: Duration::from_secs(2),
            call: Duration::from_millis(200),
        },
    )
    .expect("attach stuck");
    let stuck_region = stuck.region();
    let sleeper = target.tid("sleeper").first().copied();
    stuck.pin_thread(sleeper);
    assert!(matches!(
        stuck.syscall(34 /* pause */, &[]),
        Err(ProcessError::Timeout { .. })
    ));
    // The premise: the call is in flight, its thread blocked in pause() on
    // the region's stack. On a loaded machine the thread may reach it only
    // after the 200 ms the session waited.
    if let Some(tid) = sleeper {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let state = threads::thread_info(pid, tid).expect("the sleeper").syscall;
            if let threads::SyscallState::InSyscall { nr: 34, sp, .. } = state
                && stuck_region.contains(&sp)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the stuck call never reached pause(): {state:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    drop(stuck);
    for _ in 0..3 {
        let (r, _) = persist_helper(pid);
        assert_ne!(r, stuck_region, "a tool reused a region whose call is running");
    }
    let mut c = Remote::attach(pid, Placement::Anywhere).expect("attach c");
    assert_ne!(c.region(), stuck_region);
    assert_eq!(c.call(getpid, &[]).expect("getpid on c"), pid as u64);
    drop(c);

    // Removal takes every idle region and leaves the busy one.
    let removed = remote::remove_regions(pid).expect("remove");
    assert_eq!(removed, 1, "idle regions: the stuck session took one of the two");
    assert_eq!(remote::regions(pid).expect("regions"), vec![stuck_region.clone()]);
    let idle = if stuck_region == first { &second } else { &first };
    assert!(stuck_region == first || stuck_region == second);
    assert_region_gone(pid, idle);
    target.assert_running();
    assert_eq!(target.busy_errors(&mem), 0);
    target.assert_busy_progress(&mem, 3);
}

/// Not a test by itself: the tool process of the kill test. Attaches to the
/// pid in `HOTPATCH_REMOTE_CALL_HELPER_PID` and calls until killed.
#[test]
#[ignore]
fn helper_process() {
    let Some(pid) = std::env::var(HELPER_ENV).ok().and_then(|v| v.parse::<i32>().ok()) else {
        return;
    };
    println!("starting");
    let mut remote = Remote::attach(pid, Placement::Anywhere).expect("helper attach");
    let getpid = remote.libc_function("getpid").expect("getpid");
    println!("attached");
    for i in 0u64.. {
        let v = remote.call(getpid, &[]).expect("helper call");
        assert_eq!(v, pid as u64);
        if i % 256 == 0 {
            println!("call {i}");
        }
    }
}

#[test]
fn target_survives_a_tool_killed_at_random_moments() {
    let _apart = KILL_TEST.lock().unwrap_or_else(|e| e.into_inner());
    let t0 = Instant::now();
    let built = build();
    let mut target = start_target(&built, false);
    let pid = target.proc.pid();
    let mem = Mem::open(pid).expect("open mem");
    let exe = std::env::current_exe().expect("current exe");
    let mut rng = XorShift::seeded();
    let (mut before_attach, mut during_attach, mut during_calls) = (0, 0, 0);
    const ROUNDS: usize = 150;
    for round in 0..ROUNDS {
        let mut helper = Proc::spawn(
            Command::new(&exe)
                .args([
                    "helper_process",
                    "--exact",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(HELPER_ENV, pid.to_string()),
        );
        if round % 3 == 0 {
            // Anywhere from start-up on.
            std::thread::sleep(Duration::from_micros(rng.next() % 20_000));
        } else if round % 3 == 1 {
            // Around the bootstrap.
            helper
                .try_line(Duration::from_secs(10), |l| l.ends_with("starting"))
                .unwrap_or_else(|| panic!("helper never started: {:?}", helper.seen));
            std::thread::sleep(Duration::from_micros(rng.next() % 1_500));
        } else {
            // In the middle of the call loop.
            helper
                .try_line(Duration::from_secs(10), |l| l.ends_with("attached"))
                .unwrap_or_else(|| panic!("helper never attached: {:?}", helper.seen));
            std::thread::sleep(Duration::from_micros(rng.next() % 3_000));
        }
        let _ = helper.child.kill();
        let status = helper.child.wait().expect("reap helper");
        helper.drain();
        if helper.seen.iter().any(|l| l.ends_with("attached")) {
            during_calls += 1;
        } else if helper.seen.iter().any(|l| l.ends_with("starting")) {
            during_attach += 1;
        } else {
            before_attach += 1;
        }
        // A helper that failed on its own (not killed) is a bug.
        assert!(
            status.code().is_none(),
            "helper exited by itself ({status}): {:?}",
            helper.seen
        );
        target.assert_running();
        if round % 20 == 19 {
            assert_eq!(target.busy_errors(&mem), 0, "round {round}");
            target.assert_busy_progress(&mem, 3);
        }
    }
    // Killed tools left their region for the next: the sessions took over
    // each other's (a few may stay behind, each kept by a call its tool
    // was killed while starting, see `adopt`).
    let left_behind = remote::regions(pid).expect("regions").len();
    assert!(
        (1..=8).contains(&left_behind),
        "{left_behind} call regions after the kills"
    );
    // The target still works, and so do remote calls.
    let mut remote = Remote::attach(pid, Placement::Anywhere).expect("attach after the kills");
    let getpid = remote.libc_function("getpid").expect("getpid");
    for i in 0..20u64 {
        assert_eq!(remote.call(getpid, &[]).expect("getpid"), pid as u64);
        assert_eq!(
            remote.call(target.compute, &[i]).expect("compute"),
            expected_compute(i)
        );
    }
    let region = remote.region();
    remote.release().expect("release");
    assert_region_gone(pid, &region);
    assert_eq!(target.busy_errors(&mem), 0);
    target.assert_busy_progress(&mem, 3);
    target.assert_read_restarted("after");
    // Two more full sleeps after the kills.
    let sleeps = target.two_more_full_sleeps();
    target.signal_waiters();
    target.assert_running();
    eprintln!(
        "{ROUNDS} kills: {before_attach} before attaching, {during_attach} while attaching, \
         {during_calls} during calls; {left_behind} call regions left; {sleeps} full sleeps; {:.1?}",
        t0.elapsed()
    );
}

/// A program runs in one trip: its steps' results, the tool's part at
/// each rendezvous, stores, an abort, a failing step and a wait nobody
/// answers; the target computes on, and its threads never notice.
#[test]
fn a_program_runs_in_one_trip() {
    use hotpatch::process::program::{Arg, Check};
    let built = build();
    let mut target = start_target(&built, false);
    let pid = target.proc.pid();
    let mem = Mem::open(pid).expect("open mem");
    let mut remote = Remote::attach(pid, Placement::Anywhere).expect("attach");
    let before = remote.trips();

    let (mut p, mut d) = remote.program();
    let digits_at = d.take(32).expect("room");
    let table = d.take(32).expect("room");
    let slots = d.take(16).expect("room");
    let s_pid = p.syscall(39, &[], Check::NonNegative);
    let first = p.wait();
    let s_digits = p.digits(s_pid, digits_at);
    let s_compute = p.call(target.compute, &[Arg::Imm(7)], Check::None);
    let s_stores = p.stores(table, 2);
    let second = p.wait();
    let s_sync = p.sync_cores(0);
    let mut run = remote.start(&p).expect("start");
    let tid = run.tid();
    let policy = hotpatch::process::priority::policy_of;
    assert!(run.reach(first).expect("first rendezvous"));
    assert_eq!(run.result(s_pid).expect("result"), pid as u64);
    // The borrowed thread runs the program at a lent real-time priority
    // (the tests run as root), and gives it back itself.
    assert_eq!(policy(tid), Some(nix::libc::SCHED_FIFO), "no priority lent");
    // The table for the stores, written while the thread waits.
    let pairs: Vec<u8> = [(slots, 0x1111u64), (slots + 8, 0x2222)]
        .iter()
        .flat_map(|(a, v)| a.to_le_bytes().into_iter().chain(v.to_le_bytes()))
        .collect();
    run.write(table, &pairs).expect("table");
    run.go(first).expect("go");
    assert!(run.reach(second).expect("second rendezvous"));
    assert_eq!(run.result(s_compute).expect("result"), expected_compute(7));
    assert_eq!(run.result(s_stores).expect("result"), 2);
    assert_eq!(
        run.result(s_digits).expect("result"),
        pid.to_string().len() as u64
    );
    run.go(second).expect("go");
    let status = run.finish().0.expect("finish");
    assert!(
        status.ended && status.failed.is_none() && status.gave_up.is_none(),
        "{status:?}"
    );
    assert_gives_back(tid);
    assert_eq!(mem.read_c_string(digits_at, 32).expect("digits"), pid.to_string());
    assert_eq!(mem.read_u64(slots).expect("slot"), 0x1111);
    assert_eq!(mem.read_u64(slots + 8).expect("slot"), 0x2222);
    assert_eq!(remote.trips() - before, 1, "one trip");
    let synced = remote.mem().read_u64(
        remote.layout().scratch() + hotpatch::process::program::data::RESULTS + 8 * s_sync.0 as u64,
    );
    // membarrier(SYNC_CORE) needs a registration this target never made.
    assert_eq!(synced.expect("sync result") as i64, -1, "EPERM without a page");

    // Abort at a rendezvous: nothing after it runs.
    let (mut p, _) = remote.program();
    let phase = p.wait();
    let s_after = p.syscall(39, &[], Check::None);
    let mut run = remote.start(&p).expect("start");
    assert!(run.reach(phase).expect("rendezvous"));
    let status = run.abort().0.expect("abort");
    assert!(
        status.ended && status.gave_up.is_none() && status.failed.is_none(),
        "{status:?}"
    );
    assert_eq!(
        remote
            .mem()
            .read_u64(
                remote.layout().scratch() + hotpatch::process::program::data::RESULTS + 8 * s_after.0 as u64
            )
            .expect("result"),
        0,
        "a step after the abort ran"
    );

    // A failing step ends the program there.
    let (mut p, _) = remote.program();
    let s_bad = p.syscall(3, &[Arg::Imm(u64::MAX)], Check::NonNegative); // close(-1)
    p.wait();
    let run = remote.start(&p).expect("start");
    let status = run.finish().0.expect("finish");
    assert_eq!(status.failed, Some(s_bad), "{status:?}");
    assert_eq!(status.phase, 0);

    // A rendezvous nobody answers: the thread gives up at its deadline,
    // closing the descriptor it was told to.
    let (mut p, mut d) = remote.program();
    let name_at = d.take(16).expect("room");
    mem.write(name_at, b"hp-give-up\0").expect("name");
    let s_fd = p.syscall(319, &[Arg::Imm(name_at), Arg::Imm(1)], Check::NonNegative);
    let phase = p.wait_closing(s_fd);
    let t0 = Instant::now();
    let run = remote.start(&p).expect("start");
    let tid = run.tid();
    let status = run.finish().0.expect("finish");
    assert_eq!(status.gave_up, Some(phase), "{status:?}");
    assert_gives_back(tid);
    assert!(t0.elapsed() >= remote::BUDGET, "gave up after {:?}", t0.elapsed());
    let fd = remote.program_result(s_fd).expect("fd");
    let open = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map(|l| l.display().to_string())
        .unwrap_or_default();
    assert!(!open.contains("hp-give-up"), "descriptor {fd} left open: {open}");

    assert_eq!(target.busy_errors(&mem), 0, "a busy thread saw a wrong value");
    target.assert_busy_progress(&mem, 3);
    target.assert_running();
    assert_eq!(remote.syscall(39, &[]).expect("getpid"), pid as i64);
}

/// The thread gives back the priority a program was lent (its last
/// instructions, maybe a moment after the tool saw the program end).
fn assert_gives_back(tid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while hotpatch::process::priority::policy_of(tid) != Some(nix::libc::SCHED_OTHER) {
        assert!(Instant::now() < deadline, "thread {tid} kept a lent priority");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A tool killed while its program waits at a rendezvous: the next tool
/// finds the region, cancels the wait, and takes the region at once.
#[test]
fn a_program_left_waiting_is_cancelled_by_the_next_tool() {
    let built = build();
    let mut target = start_target(&built, false);
    let pid = target.proc.pid();
    let mem = Mem::open(pid).expect("open mem");
    let region = {
        let mut remote = Remote::attach(pid, Placement::Anywhere).expect("attach");
        let (mut p, _) = remote.program();
        let phase = p.wait();
        let mut run = remote.start(&p).expect("start");
        assert!(run.reach(phase).expect("rendezvous"));
        // The tool "dies": its session (and the region's lock) goes away
        // with the program still waiting.
        run.region()
    };
    let t0 = Instant::now();
    let remote = Remote::attach(pid, Placement::Anywhere).expect("attach again");
    assert_eq!(
        remote.region(),
        region,
        "the waiting program's region was not taken"
    );
    // The thread gave back the priority it was lent, on its own.
    for t in threads::threads(pid).expect("threads") {
        assert_ne!(
            hotpatch::process::priority::policy_of(t.tid),
            Some(nix::libc::SCHED_FIFO),
            "thread {} kept a lent priority",
            t.tid
        );
    }
    assert!(
        t0.elapsed() < remote::BUDGET,
        "attach waited {:?}: the wait was not cancelled",
        t0.elapsed()
    );
    assert_eq!(target.busy_errors(&mem), 0);
    target.assert_busy_progress(&mem, 3);
    target.assert_running();
}
