//! A real server from Debian's packages, patched under load: the packaged
//! redis-server (stripped, no padding, so every function goes through a
//! 5-byte detour written with every thread stopped). Redis calls its
//! `xxxCommand(client *)` functions through the command table's function
//! pointers; `tests/live/redis_patch.c` replaces `pingCommand` (PING
//! answers `PATCHED-<tag> <n>`) and `echoCommand` (a pass-through that
//! counts the call and runs the original through its relocated
//! trampoline).
//!
//! Eight client connections send PING, ECHO and INCR for the whole test,
//! checking every answer against the phase the test is in: before apply
//! PONG; once apply has returned, every PING is patched; a second patch
//! stacks on the first, reverting it steps back, reverting the first
//! brings PONG back and the original code bytes. ECHO always echoes, INCR
//! always counts, no request fails, no connection drops. Last, a patch of
//! `addReplyStatus`, which redis's own code calls directly, is refused
//! without `--allow-direct-calls`, and nothing changes.
//!
//! `.ci/run` installs the `redis-server` package; without it the test is
//! skipped (with a message).

#[path = "common/live.rs"]
mod live;

use live::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const REDIS: &str = "/usr/bin/redis-server";

/// The patch of `pingCommand` and `echoCommand` (`-DTAG=n` tells which
/// patch answers a PING).
const PATCH_C: &str = include_str!("live/redis_patch.c");

/// A patch of `addReplyStatus`, which redis calls directly (`call rel32`)
/// from many places of its own image: refused without the flag.
const DIRECT_C: &str = r#"
#include "hotpatch.h"
HOTPATCH_ORIGINAL(void, addReplyStatus, (void *, const char *));
void status_replaced(void *c, const char *status) {
    (void)status;
    orig_addReplyStatus(c, "REPLACED");
}
HOTPATCH_REPLACE(addReplyStatus, status_replaced);
"#;

const CLIENTS: usize = 8;

/// The phases of the test and the PING answers each allows (0: PONG,
/// n: patch n). A request is checked against every phase from the one
/// it was sent in to the one its answer arrived in.
const PHASES: &[(&str, &[u8])] = &[
    ("original", &[0]),
    ("applying A", &[0, 1]),
    ("A", &[1]),
    ("applying B over A", &[1, 2]),
    ("B over A", &[2]),
    ("reverting B", &[2, 1]),
    ("A again", &[1]),
    ("reverting A", &[1, 0]),
    ("reverted", &[0]),
    ("refused apply", &[0]),
    ("after the refused apply", &[0]),
];

/// The phases between tool runs: each must see requests of every kind.
const STABLE: &[usize] = &[0, 2, 4, 6, 8, 10];

const OPS: [&str; 3] = ["PING", "ECHO", "INCR"];

/// How long the test stays at least in each phase between tool runs.
const SETTLE: Duration = Duration::from_millis(300);

// ------------------------------------------------------------- redis

/// Our own redis-server on a free port, killed and reaped on drop (its
/// log is printed if the test failed).
struct Redis {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Redis {
    fn start(dir: &Path) -> Redis {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = dir.join("redis.log");
        let child = Command::new(REDIS)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--io-threads", "2", "--io-threads-do-reads", "yes"])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {REDIS}: {e}"));
        let mut redis = Redis { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = redis.child.try_wait() {
                panic!(
                    "redis-server exited ({status}) before answering: {}",
                    redis.log_tail()
                );
            }
            if let Ok(mut c) = Conn::open(port)
                && let Ok(Reply::Status(s)) = c.call(&[b"PING"])
            {
                assert_eq!(s, "PONG");
                return redis;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server never answered PING: {}",
                redis.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("redis-server log (last lines):\n{}", self.log_tail());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// -------------------------------------------------------------- RESP

#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Other(String),
}

/// One connection speaking RESP2, one request at a time.
struct Conn {
    read: BufReader<TcpStream>,
    write: TcpStream,
}

fn io_err(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

impl Conn {
    fn open(port: u16) -> std::io::Result<Conn> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Conn {
            read: BufReader::new(s.try_clone()?),
            write: s,
        })
    }

    fn call(&mut self, args: &[&[u8]]) -> std::io::Result<Reply> {
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a);
            req.extend_from_slice(b"\r\n");
        }
        self.write.write_all(&req)?;
        let mut line = String::new();
        if self.read.read_line(&mut line)? == 0 {
            return Err(io_err("connection closed".into()));
        }
        let line = line
            .strip_suffix("\r\n")
            .ok_or_else(|| io_err(format!("reply line {line:?}")))?;
        let (kind, rest) = line.split_at(1);
        Ok(match kind {
            "+" => Reply::Status(rest.to_string()),
            "-" => Reply::Error(rest.to_string()),
            ":" => Reply::Int(rest.parse().map_err(|_| io_err(format!("integer {line:?}")))?),
            "$" => {
                let n: i64 = rest.parse().map_err(|_| io_err(format!("bulk {line:?}")))?;
                if n < 0 {
                    Reply::Bulk(None)
                } else {
                    let mut buf = vec![0; n as usize + 2];
                    self.read.read_exact(&mut buf)?;
                    if !buf.ends_with(b"\r\n") {
                        return Err(io_err(format!("bulk of {n} bytes not ended by CRLF")));
                    }
                    buf.truncate(n as usize);
                    Reply::Bulk(Some(buf))
                }
            }
            _ => Reply::Other(line.to_string()),
        })
    }
}

// ------------------------------------------------------------- load

/// What the clients share with the test.
struct Load {
    port: u16,
    phase: AtomicUsize,
    stop: AtomicBool,
    /// Requests sent and answered within one phase: `counts[phase][op]`.
    counts: Vec<[AtomicU64; 3]>,
    /// ECHOs whose count by the patch a later PING confirmed.
    echoes_confirmed: AtomicU64,
    failures: AtomicU64,
    disconnects: AtomicU64,
    /// The first few failure messages.
    messages: Mutex<Vec<String>>,
}

impl Load {
    fn new(port: u16) -> Load {
        Load {
            port,
            phase: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            counts: PHASES.iter().map(|_| Default::default()).collect(),
            echoes_confirmed: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            messages: Mutex::new(Vec::new()),
        }
    }

    fn fail(&self, msg: String) {
        self.failures.fetch_add(1, Ordering::SeqCst);
        let mut m = self.messages.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() < 20 {
            m.push(msg);
        }
    }

    fn count(&self, phase: usize, op: usize) -> u64 {
        self.counts[phase][op].load(Ordering::SeqCst)
    }

    /// Enter `phase` (the tool runs that follow belong to it).
    fn enter(&self, phase: usize) {
        self.phase.store(phase, Ordering::SeqCst);
    }

    /// Stay in the current phase for at least `SETTLE`, until it has seen
    /// a good number of requests of every kind.
    fn settle(&self) {
        let phase = self.phase.load(Ordering::SeqCst);
        let start = Instant::now();
        let deadline = start + WAIT;
        while start.elapsed() < SETTLE || (0..3).any(|op| self.count(phase, op) < 100) {
            assert!(
                Instant::now() < deadline,
                "phase {:?}: too few requests: {:?}",
                PHASES[phase].0,
                (0..3).map(|op| self.count(phase, op)).collect::<Vec<_>>()
            );
            assert_eq!(
                self.failures.load(Ordering::SeqCst),
                0,
                "{:?}",
                self.messages.lock()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A PING answer: 0 for PONG, or the patch's tag and echo count.
fn ping_answer(reply: &Reply) -> Option<(u8, u64)> {
    let Reply::Status(s) = reply else { return None };
    if s == "PONG" {
        return Some((0, 0));
    }
    let (tag, n) = s.strip_prefix("PATCHED-")?.split_once(' ')?;
    Some((tag.parse().ok()?, n.parse().ok()?))
}

/// One client: requests until told to stop, every answer checked.
fn client(load: &Load, index: usize, mut rng: XorShift) {
    let key = format!("hotpatch-test:counter:{index}");
    let mut conn: Option<Conn> = None;
    let mut incr = 0i64;
    // Per patch tag: the echo count its last PING answer showed, and the
    // ECHOs answered since then that must have gone through that patch.
    let mut seen = [0u64; 3];
    let mut pending = [0u64; 3];
    while !load.stop.load(Ordering::SeqCst) {
        if conn.is_none() {
            match Conn::open(load.port) {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    load.fail(format!("client {index}: connect: {e}"));
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("connected");
        let op = rng.below(3) as usize;
        let arg: Vec<u8> = {
            let len = if rng.below(20) == 0 {
                rng.below(20_000)
            } else {
                rng.below(64)
            };
            (0..len).map(|_| rng.next() as u8).collect()
        };
        let args: Vec<&[u8]> = match op {
            0 => vec![b"PING"],
            1 => vec![b"ECHO", &arg],
            _ => vec![b"INCR", key.as_bytes()],
        };
        let p0 = load.phase.load(Ordering::SeqCst);
        let reply = c.call(&args);
        let p1 = load.phase.load(Ordering::SeqCst);
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                load.disconnects.fetch_add(1, Ordering::SeqCst);
                load.fail(format!(
                    "client {index}: {} in phase {:?}..{:?}: {e}",
                    OPS[op], PHASES[p0].0, PHASES[p1].0
                ));
                conn = None;
                continue;
            }
        };
        let allowed: Vec<u8> = PHASES[p0..=p1].iter().flat_map(|p| p.1.iter().copied()).collect();
        let ok = match op {
            0 => match ping_answer(&reply) {
                Some((tag, n)) if allowed.contains(&tag) => {
                    let t = tag as usize;
                    if tag != 0 && n < seen[t] + pending[t] {
                        load.fail(format!(
                            "client {index}: PING answered {reply:?}: patch {tag} counted fewer ECHOs than the \
                             {} answered since it showed {}",
                            pending[t], seen[t]
                        ));
                    }
                    if tag != 0 {
                        load.echoes_confirmed.fetch_add(pending[t], Ordering::SeqCst);
                        seen[t] = n;
                        pending[t] = 0;
                    }
                    true
                }
                _ => false,
            },
            1 => {
                let ok = reply == Reply::Bulk(Some(arg.clone()));
                // Sent and answered while one patch alone ran ECHO: it counted it.
                if ok && p0 == p1 && PHASES[p0].1.len() == 1 && PHASES[p0].1[0] != 0 {
                    pending[PHASES[p0].1[0] as usize] += 1;
                }
                ok
            }
            _ => {
                incr += 1;
                reply == Reply::Int(incr)
            }
        };
        if !ok {
            let shown = match &reply {
                Reply::Bulk(Some(b)) if b.len() > 80 => format!("{} bytes", b.len()),
                r => format!("{r:?}"),
            };
            load.fail(format!(
                "client {index}: {} (arg of {} bytes) answered {shown} in phase {:?}..{:?} (PING may be {allowed:?}, \
                 INCR {incr})",
                OPS[op],
                arg.len(),
                PHASES[p0].0,
                PHASES[p1].0
            ));
            if op == 2
                && let Reply::Int(n) = reply
            {
                incr = n;
            }
        }
        if p0 == p1 {
            load.counts[p0][op].fetch_add(1, Ordering::SeqCst);
        }
    }
}

// ------------------------------------------------------------ oracles

/// A `.dynsym` function of `exe` (from `nm -D -S`): value and size.
fn dynsym(exe: &Path, name: &str) -> (u64, usize) {
    let out = Command::new("nm")
        .arg("-D")
        .arg("-S")
        .arg(exe)
        .output()
        .expect("run nm");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 4 && f[3] == name && f[2] == "T").then(|| {
                (
                    u64::from_str_radix(f[0], 16).expect("hex value"),
                    usize::from_str_radix(f[1], 16).expect("hex size"),
                )
            })
        })
        .unwrap_or_else(|| panic!("{name} not exported by {}", exe.display()))
}

/// A function of the running redis: its address (load bias from
/// `/proc/PID/maps`) and size.
fn function_in(pid: i32, exe: &Path, name: &str) -> (u64, usize) {
    let (value, size) = dynsym(exe, name);
    let exe = exe.to_str().expect("utf-8");
    let base = maps(pid)
        .lines()
        .find(|l| l.ends_with(exe))
        .and_then(|l| l.split('-').next())
        .map(|s| u64::from_str_radix(s, 16).expect("hex"))
        .unwrap_or_else(|| panic!("{exe} not mapped in {pid}"));
    (base + value, size)
}

/// The applied function named `name` in an apply's JSON.
fn applied<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["functions"]
        .as_array()
        .expect("functions[]")
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("{name} not applied: {doc}"))
}

#[test]
fn redis_server_patched_under_load() {
    let _serial = serial();
    if !Path::new(REDIS).exists() {
        eprintln!("SKIPPED: {REDIS} is not installed (apt-get install redis-server; .ci/run does)");
        return;
    }
    let started = Instant::now();
    let exe = std::fs::canonicalize(REDIS).expect("canonical redis-server");
    let dir = tempfile::tempdir().expect("tempdir");
    let patch_a = build_patch(dir.path(), "redis_patch_a", &format!("#define TAG 1\n{PATCH_C}"));
    let patch_b = build_patch(dir.path(), "redis_patch_b", &format!("#define TAG 2\n{PATCH_C}"));
    let direct = build_patch(dir.path(), "redis_direct", DIRECT_C);
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("mkdir data");
    let mut redis = Redis::start(&data);
    let pid = redis.pid();
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, Iterator::count);
    eprintln!("redis-server pid {pid}, port {}, {threads} threads", redis.port);

    let ping = function_in(pid, &exe, "pingCommand");
    let echo = function_in(pid, &exe, "echoCommand");
    let status = function_in(pid, &exe, "addReplyStatus");
    let code = |(at, size): (u64, usize)| read_mem(pid, at, size);
    let (ping_orig, echo_orig, status_orig) = (code(ping), code(echo), code(status));

    let load = Arc::new(Load::new(redis.port));
    let mut rng = XorShift::seeded();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let load = Arc::clone(&load);
            let rng = XorShift(rng.next() | 1);
            std::thread::spawn(move || client(&load, i, rng))
        })
        .collect();
    // The clients stop when the test ends, passed or failed.
    struct StopClients(Arc<Load>);
    impl Drop for StopClients {
        fn drop(&mut self) {
            self.0.stop.store(true, Ordering::SeqCst);
        }
    }
    let stop = StopClients(Arc::clone(&load));
    load.settle();

    // Patch A: both functions are unprepared, so both take the detour,
    // written with every thread stopped.
    load.enter(1);
    let doc = apply(pid, &patch_a, &[]);
    load.enter(2);
    let id_a = doc["patch"]["id"].as_u64().expect("patch id");
    for (name, (at, _)) in [("pingCommand", ping), ("echoCommand", echo)] {
        let f = applied(&doc, name);
        assert_eq!(f["entry"].as_u64(), Some(at), "{name}'s entry: {f}");
        assert_eq!(f["route"], "detour", "{f}");
        assert_eq!(f["mode"], "stopped", "{f}");
        assert!(f["stopped_us"].as_u64().is_some(), "{f}");
    }
    eprintln!(
        "apply A: {} µs; threads stopped {} µs (pingCommand), {} µs (echoCommand)",
        doc["elapsed_us"],
        applied(&doc, "pingCommand")["stopped_us"],
        applied(&doc, "echoCommand")["stopped_us"]
    );
    let ping_a = code(ping);
    assert_eq!(
        ping_a[0],
        0xe9,
        "pingCommand starts with a jmp rel32: {:02x?}",
        &ping_a[..8]
    );
    assert_eq!(code(echo)[0], 0xe9, "echoCommand starts with a jmp rel32");
    assert_eq!(listed_ids(pid), vec![id_a]);
    load.settle();

    // Patch B over A: supersedes it.
    load.enter(3);
    let doc = apply(pid, &patch_b, &[]);
    load.enter(4);
    let id_b = doc["patch"]["id"].as_u64().expect("patch id");
    for name in ["pingCommand", "echoCommand"] {
        let f = applied(&doc, name);
        assert_eq!(f["mode"], "superseded", "{f}");
        assert_eq!(f["route"], "detour", "{f}");
    }
    assert_eq!(
        code(ping),
        ping_a,
        "a newer version leaves the entry's jump as it is"
    );
    assert_eq!(listed_ids(pid), vec![id_a, id_b]);
    load.settle();

    // Revert B: A again, not the original.
    load.enter(5);
    let r = revert(pid, Some(id_b));
    load.enter(6);
    assert_eq!(r[0]["stepped_back"].as_array().map(Vec::len), Some(2), "{r}");
    assert_eq!(listed_ids(pid), vec![id_a]);
    load.settle();

    // Revert A: the original, byte for byte.
    load.enter(7);
    let r = revert(pid, Some(id_a));
    load.enter(8);
    assert_eq!(r[0]["restored"].as_array().map(Vec::len), Some(2), "{r}");
    assert_eq!(code(ping), ping_orig, "pingCommand's code after revert");
    assert_eq!(code(echo), echo_orig, "echoCommand's code after revert");
    assert_eq!(listed_ids(pid), Vec::<u64>::new());
    load.settle();

    // addReplyStatus is called directly from redis's own code: refused
    // without --allow-direct-calls, before anything is touched.
    load.enter(9);
    let run = hotpatch(&["apply".to_string(), pid.to_string(), direct.display().to_string()]);
    load.enter(10);
    let msg = run.failure();
    assert!(msg.contains("addReplyStatus"), "{msg}");
    assert!(msg.contains("--allow-direct-calls"), "{msg}");
    assert_eq!(
        code(status),
        status_orig,
        "addReplyStatus's code after the refused apply"
    );
    assert_eq!(code(ping), ping_orig);
    assert!(!maps_file(pid, &direct), "the refused patch is not loaded");
    assert_eq!(listed_ids(pid), Vec::<u64>::new());
    load.settle();

    drop(stop);
    for c in clients {
        c.join().expect("client thread");
    }
    let failures = load.failures.load(Ordering::SeqCst);
    let disconnects = load.disconnects.load(Ordering::SeqCst);
    let mut total = 0;
    for (i, (name, _)) in PHASES.iter().enumerate() {
        let n: Vec<u64> = (0..3).map(|op| load.count(i, op)).collect();
        total += n.iter().sum::<u64>();
        eprintln!(
            "phase {name:24} PING {:6}  ECHO {:6}  INCR {:6}",
            n[0], n[1], n[2]
        );
    }
    let confirmed = load.echoes_confirmed.load(Ordering::SeqCst);
    eprintln!(
        "{total} requests from {CLIENTS} clients in {:.1} s: {failures} failed, {disconnects} disconnects; \
         {confirmed} ECHOs confirmed counted by the patch",
        started.elapsed().as_secs_f64()
    );
    assert_eq!((failures, disconnects), (0, 0), "{:#?}", load.messages.lock());
    for &p in STABLE {
        for (op, name) in OPS.iter().enumerate() {
            assert!(load.count(p, op) > 0, "no {name} in phase {:?}", PHASES[p].0);
        }
    }
    assert!(confirmed > 0, "no ECHO was confirmed counted by the patch");

    // Still the server it was.
    assert!(redis.alive(), "redis-server died");
    let mut c = Conn::open(redis.port).expect("connect");
    assert_eq!(c.call(&[b"PING"]).expect("PING"), Reply::Status("PONG".into()));
    assert_eq!(
        c.call(&[b"ECHO", b"still here"]).expect("ECHO"),
        Reply::Bulk(Some(b"still here".to_vec()))
    );
    assert_no_thread_stopped(pid);
}
