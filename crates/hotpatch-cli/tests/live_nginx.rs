//! nginx from Debian's package (master and two workers), patched with one
//! `hotpatch apply --all` under load: every process of that build is
//! patched; after a reload (SIGHUP), the new workers, forked from the
//! patched master, are patched too; `hotpatch revert --everywhere`
//! restores every process; `status` agrees with the code bytes at each
//! step, and no request fails.
//!
//! The nginx run is a copy of the packaged binary whose build-id note has
//! one byte changed (its code is the package's, byte for byte): the patch
//! is made for that build-id, so `--all` cannot reach an nginx the host
//! itself runs. `tests/live/nginx_patch.c` replaces the content phase's
//! checker with one that answers 403.
//!
//! `.ci/run` installs the `nginx-core` package; without it the test is
//! skipped (with a message).

#[path = "common/mod.rs"]
mod common;
#[path = "common/live.rs"]
mod live;

use live::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const NGINX: &str = "/usr/sbin/nginx";
const PATCH_C: &str = include_str!("live/nginx_patch.c");

fn build_id_of(path: &Path) -> String {
    let notes = stdout_of(Command::new("readelf").arg("-n").arg(path));
    notes
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .unwrap_or_else(|| panic!("no build-id in {}", path.display()))
        .trim()
        .to_string()
}

/// A copy of the packaged nginx with the last byte of its build-id changed.
fn private_copy(dir: &Path) -> PathBuf {
    let id = build_id_of(Path::new(NGINX));
    let bytes: Vec<u8> = (0..id.len() / 2)
        .map(|i| u8::from_str_radix(&id[2 * i..2 * i + 2], 16).expect("hex"))
        .collect();
    let mut file = std::fs::read(NGINX).expect("read nginx");
    let at = file
        .windows(bytes.len())
        .position(|w| w == bytes.as_slice())
        .expect("the build-id bytes are in the file");
    let last = at + bytes.len() - 1;
    file[last] ^= 0x5a;
    let copy = dir.join("nginx");
    std::fs::write(&copy, &file).expect("write the copy");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    assert_ne!(build_id_of(&copy), id);
    copy
}

/// Our nginx (master in the foreground, two workers), killed on drop.
struct Nginx {
    master: Child,
    port: u16,
    log: PathBuf,
}

impl Nginx {
    fn start(dir: &Path, exe: &Path) -> Nginx {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let html = dir.join("html");
        std::fs::create_dir_all(&html).expect("mkdir html");
        std::fs::write(html.join("index.html"), "hello\n").expect("index");
        let log = dir.join("error.log");
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "user root;\nworker_processes 2;\ndaemon off;\npid {dir}/nginx.pid;\nerror_log {log} info;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{ access_log off;\n client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;\n \
                 fastcgi_temp_path {dir}/fastcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;\n \
                 server {{ listen 127.0.0.1:{port}; root {html}; }} }}\n",
                dir = dir.display(),
                log = log.display(),
                html = html.display(),
            ),
        )
        .expect("conf");
        let master = Command::new(exe)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", exe.display()));
        let mut nginx = Nginx { master, port, log };
        let deadline = Instant::now() + WAIT;
        while get(port).ok() != Some(200) || nginx.workers().len() < 2 {
            if let Ok(Some(status)) = nginx.master.try_wait() {
                panic!("nginx exited ({status}): {}", nginx.log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "nginx never answered: {}",
                nginx.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        nginx
    }

    fn pid(&self) -> i32 {
        self.master.id() as i32
    }

    /// The master's children: its workers (old ones too, while they finish).
    fn workers(&self) -> BTreeSet<i32> {
        let pid = self.pid();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("nginx log (last lines):\n{}", self.log_tail());
        }
        let workers = self.workers();
        let _ = self.master.kill();
        let _ = self.master.wait();
        for w in workers {
            let _ = Command::new("kill").arg("-KILL").arg(w.to_string()).status();
        }
    }
}

/// One `GET /` on a new connection: the status code.
fn get(port: u16) -> std::io::Result<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    reply
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {reply:?}")))
}

/// The status entries of these pids: each process's entries' states.
fn entry_states(pids: &BTreeSet<i32>) -> Vec<(i32, Vec<String>)> {
    let v = hotpatch(&["status", "--json"]).json();
    v.as_array()
        .expect("status is an array")
        .iter()
        .filter(|p| p["pid"].as_i64().is_some_and(|pid| pids.contains(&(pid as i32))))
        .map(|p| {
            let states = p["entries"]
                .as_array()
                .map(|e| {
                    e.iter()
                        .map(|e| e["state"].as_str().unwrap_or("?").to_string())
                        .collect()
                })
                .unwrap_or_default();
            (p["pid"].as_i64().unwrap_or(0) as i32, states)
        })
        .collect()
}

/// The first bytes of `ngx_http_core_content_phase` in process `pid`.
fn entry_bytes(pid: i32, exe: &Path, offset: u64) -> Vec<u8> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let base = maps
        .lines()
        .find(|l| l.ends_with(exe.to_str().expect("path")) && l.split_whitespace().nth(2) == Some("00000000"))
        .and_then(|l| l.split('-').next())
        .and_then(|a| u64::from_str_radix(a, 16).ok())
        .expect("nginx's first mapping");
    read_mem(pid, base + offset, 5)
}

fn read_mem(pid: i32, address: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("mem");
    let mut buf = vec![0; len];
    mem.read_exact_at(&mut buf, address).expect("read mem");
    buf
}

#[test]
fn nginx_master_and_workers_patched_by_one_apply_all_reload_and_revert_everywhere() {
    if !Path::new(NGINX).exists() {
        eprintln!("SKIPPED: {NGINX} is not installed (apt-get install nginx-core; .ci/run does)");
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = private_copy(dir.path());
    let patch = build_sources(
        dir.path(),
        "gcc",
        "nginx_patch.so",
        &[("nginx_patch.c", PATCH_C)],
        &[
            "-O2",
            "-shared",
            "-fPIC",
            &include_arg(),
            &format!("-DBUILD_ID=\"{}\"", build_id_of(&exe)),
        ],
    );
    let offset = common::symbols(&exe)
        .into_iter()
        .find(|s| s.name == "ngx_http_core_content_phase")
        .map(|s| s.value)
        .expect("ngx_http_core_content_phase in .dynsym");
    let nginx = Nginx::start(dir.path(), &exe);
    let original = entry_bytes(nginx.pid(), &exe, offset);

    // Load: a client without pause; every request must be answered.
    let stop = Arc::new(AtomicBool::new(false));
    let (answered, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, answered, failed, port) = (stop.clone(), answered.clone(), failed.clone(), nginx.port);
        std::thread::spawn(move || {
            let mut last_error = None;
            while !stop.load(Ordering::Relaxed) {
                match get(port) {
                    Ok(200 | 403) => answered.fetch_add(1, Ordering::Relaxed),
                    Ok(code) => {
                        last_error = Some(format!("status {code}"));
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        last_error = Some(e.to_string());
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            last_error
        })
    };

    // 1. One command patches the master and both workers.
    let mut all: BTreeSet<i32> = nginx.workers();
    all.insert(nginx.pid());
    let run = hotpatch(&["apply", "--all", patch.to_str().expect("path"), "--json"]);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    let run: Value = run.json();
    let applied: BTreeSet<i32> = run["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .filter(|p| p["outcome"] == "applied")
        .map(|p| p["pid"].as_i64().expect("pid") as i32)
        .collect();
    assert_eq!(applied, all, "{run:#}");
    for _ in 0..20 {
        assert_eq!(get(nginx.port).expect("GET"), 403);
    }
    let states = entry_states(&all);
    assert_eq!(states.len(), all.len(), "{states:?}");
    for (pid, s) in &states {
        assert_eq!(s, &vec!["patched".to_string()], "process {pid}");
        assert_ne!(entry_bytes(*pid, &exe, offset), original, "process {pid}");
    }

    // 2. A reload: new workers, forked from the patched master, run the fix.
    let old_workers = nginx.workers();
    run_ok(Command::new("kill").arg("-HUP").arg(nginx.pid().to_string()));
    let deadline = Instant::now() + WAIT;
    let new_workers = loop {
        let now = nginx.workers();
        if now.len() >= 2 && now.is_disjoint(&old_workers) {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "no new workers: {now:?} (old {old_workers:?})"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    for _ in 0..20 {
        assert_eq!(get(nginx.port).expect("GET"), 403);
    }
    let mut now_all = new_workers.clone();
    now_all.insert(nginx.pid());
    for (pid, s) in entry_states(&now_all) {
        assert_eq!(s, vec!["patched".to_string()], "process {pid}");
        assert_ne!(entry_bytes(pid, &exe, offset), original, "process {pid}");
    }

    // 3. One command reverts every process.
    let run = hotpatch(&["revert", "--everywhere", patch.to_str().expect("path"), "--json"]);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    let run: Value = run.json();
    let reverted: BTreeSet<i32> = run["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .filter(|p| p["outcome"] == "reverted")
        .map(|p| p["pid"].as_i64().expect("pid") as i32)
        .collect();
    assert_eq!(reverted, now_all, "{run:#}");
    for _ in 0..20 {
        assert_eq!(get(nginx.port).expect("GET"), 200);
    }
    for pid in &now_all {
        assert_eq!(entry_bytes(*pid, &exe, offset), original, "process {pid}");
    }
    assert!(
        entry_states(&now_all).iter().all(|(_, s)| s.is_empty()),
        "status lists a reverted process with patches"
    );

    stop.store(true, Ordering::Relaxed);
    let last_error = load.join().expect("load thread");
    let (answered, failed) = (answered.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("nginx: {answered} requests answered under load, {failed} failed");
    assert_eq!(failed, 0, "requests failed; the last: {last_error:?}");
    assert!(answered > 0);
}
