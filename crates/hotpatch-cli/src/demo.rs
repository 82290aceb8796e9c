//! `hotpatch demo`: the live-patch demo on the bundled example server.
//!
//! Builds `examples/server` (a multi-threaded TCP fee service with a bug in
//! `compute_fee`) and its fix, starts the server, drives client load from
//! several threads, applies the fix live, shows the answers before and
//! after, counts failed and wrong requests, compares the worst stall the
//! server's threads saw in a window with the apply against an equal window
//! without, then reverts. With `--unprepared` the server is built without
//! padding, and the same fix goes in through a detour.

use crate::output::say;
use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const SERVER_C: &str = include_str!("../../../examples/server/server.c");
const FIX_C: &str = include_str!("../../../examples/server/fix.c");
const HEADER: &str = include_str!("../../../include/hotpatch.h");

/// Amounts the clients ask about: small ones (correct before and after)
/// and large ones (the bug: no fee).
const AMOUNTS: [i64; 4] = [500, 12_345, 1_000_000, 2_500_000];

#[derive(clap::Args)]
pub struct Args {
    /// C compiler to build the example with.
    #[arg(long, default_value = "cc")]
    cc: String,
    /// Client threads driving load.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Server worker threads (each serves one connection at a time: the
    /// clients, a control connection and one spare).
    #[arg(long, default_value_t = 6)]
    workers: usize,
    /// Length of each measurement window, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    window_ms: u64,
    /// Build the server without padding (as a distribution would), so the
    /// fix goes in through a detour written with every thread stopped.
    #[arg(long)]
    unprepared: bool,
}

/// How the server is built: with padding, or (`--unprepared`) without it
/// and with `-fno-ipa-ra`, so that its direct calls to `compute_fee` rely
/// on nothing but the ABI and the detour may take them.
fn server_flags(unprepared: bool) -> &'static [&'static str] {
    if unprepared {
        &["-O2", "-g", "-pthread", "-fno-ipa-ra"]
    } else {
        &["-O2", "-g", "-pthread", "-fpatchable-function-entry=8,6"]
    }
}

fn buggy_fee(amount: i64) -> i64 {
    if amount <= 0 || amount >= 1_000_000 {
        0
    } else {
        (amount / 100).max(1)
    }
}

fn fixed_fee(amount: i64) -> i64 {
    if amount >= 1_000_000 {
        amount / 100
    } else {
        buggy_fee(amount)
    }
}

/// Kills the server however the demo ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn compile(cc: &str, args: &[&str], out: &Path, src: &Path) -> Result<()> {
    let status = Command::new(cc)
        .args(args)
        .arg("-o")
        .arg(out)
        .arg(src)
        .status()
        .with_context(|| format!("cannot run the C compiler `{cc}`"))?;
    if !status.success() {
        bail!("`{cc}` failed to build {} ({status})", src.display());
    }
    Ok(())
}

/// Build the server and the fix into `dir`.
pub fn build(cc: &str, dir: &Path, unprepared: bool) -> Result<(PathBuf, PathBuf)> {
    std::fs::write(dir.join("server.c"), SERVER_C)?;
    std::fs::write(dir.join("fix.c"), FIX_C)?;
    std::fs::write(dir.join("hotpatch.h"), HEADER)?;
    let server = dir.join("fee-server");
    let fix = dir.join("fix.so");
    compile(cc, server_flags(unprepared), &server, &dir.join("server.c"))?;
    let include = format!("-I{}", dir.display());
    compile(
        cc,
        &["-O2", "-shared", "-fPIC", &include],
        &fix,
        &dir.join("fix.c"),
    )?;
    Ok((server, fix))
}

/// A connection for the demo's own questions.
struct Control {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Control {
    fn connect(port: u16) -> Result<Control> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Control {
            writer: s.try_clone()?,
            reader: BufReader::new(s),
        })
    }

    fn ask(&mut self, line: &str) -> Result<String> {
        self.writer.write_all(format!("{line}\n").as_bytes())?;
        let mut answer = String::new();
        self.reader
            .read_line(&mut answer)
            .with_context(|| format!("no answer from the server to {line:?}"))?;
        Ok(answer.trim().to_string())
    }
}

fn worst_late_us(control: &mut Control) -> Result<u64> {
    let stats = control.ask("STATS")?;
    stats
        .split_whitespace()
        .nth(3)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("unexpected STATS answer {stats:?}"))
}

/// Shared counters of the load threads.
#[derive(Default)]
struct Load {
    requests: AtomicU64,
    failed: AtomicU64,
    /// Answers that are neither the buggy nor the fixed fee.
    wrong: AtomicU64,
    /// Requests sent after the apply returned that got the buggy answer.
    stale_after_apply: AtomicU64,
    /// Requests sent after the revert returned that got the fixed answer.
    stale_after_revert: AtomicU64,
    /// Worst request round trip since the last reset, in µs.
    worst_rtt_us: AtomicU64,
    /// 0 = buggy expected, 1 = fixed expected, 2 = either (in transition).
    phase: AtomicU64,
    stop: AtomicBool,
}

fn client(port: u16, load: &Load, seed: usize) {
    let run = || -> Result<()> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        let mut i = seed;
        let mut line = String::new();
        while !load.stop.load(Ordering::Relaxed) {
            let amount = AMOUNTS[i % AMOUNTS.len()];
            i += 1;
            let phase = load.phase.load(Ordering::SeqCst);
            let sent = Instant::now();
            writer.write_all(format!("FEE {amount}\n").as_bytes())?;
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                bail!("connection closed");
            }
            let rtt = sent.elapsed().as_micros() as u64;
            load.worst_rtt_us.fetch_max(rtt, Ordering::Relaxed);
            load.requests.fetch_add(1, Ordering::Relaxed);
            // A request proves something only if no transition (apply or
            // revert) started between its sending and its answer.
            let phase = if load.phase.load(Ordering::SeqCst) == phase {
                phase
            } else {
                2
            };
            let fee: i64 = line.trim().parse().unwrap_or(i64::MIN);
            let (old, new) = (buggy_fee(amount), fixed_fee(amount));
            if fee != old && fee != new {
                load.wrong.fetch_add(1, Ordering::Relaxed);
            } else if phase == 1 && fee != new {
                load.stale_after_apply.fetch_add(1, Ordering::Relaxed);
            } else if phase == 0 && fee != old {
                load.stale_after_revert.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    };
    if let Err(e) = run() {
        tracing::warn!("client {seed}: {e}");
        load.failed.fetch_add(1, Ordering::Relaxed);
    }
}

fn answers(control: &mut Control) -> Result<String> {
    let mut parts = Vec::new();
    for amount in [500, 2_500_000] {
        parts.push(format!(
            "fee({amount}) = {}",
            control.ask(&format!("FEE {amount}"))?
        ));
    }
    Ok(parts.join(", "))
}

pub fn run(args: Args) -> Result<()> {
    let dir = tempfile::Builder::new().prefix("hotpatch-demo-").tempdir()?;
    run_in(&args, dir.path())
}

fn run_in(args: &Args, dir: &Path) -> Result<()> {
    if args.workers < args.clients + 2 {
        bail!(
            "--workers must be at least --clients + 2 (each worker serves one connection at a time; {} clients need {})",
            args.clients,
            args.clients + 2
        );
    }
    say!(
        "== building fee-server ({} {}) and fix.so",
        args.cc,
        server_flags(args.unprepared).join(" ")
    );
    let (bin, fix) = build(&args.cc, dir, args.unprepared)?;
    let mut child = Command::new(&bin)
        .args(["0", &args.workers.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start the example server")?;
    let stdout = child.stdout.take().context("no stdout from the server")?;
    let server = Server(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let port: u16 = line
        .trim()
        .strip_prefix("listening on ")
        .and_then(|p| p.parse().ok())
        .context("the server did not start")?;
    let pid = i32::try_from(server.0.id())?;
    say!(
        "== fee-server pid {pid}, {} worker threads, 127.0.0.1:{port}",
        args.workers
    );
    let mut control = Control::connect(port)?;
    say!(
        "   before:  {}   (the bug: large amounts pay no fee)",
        answers(&mut control)?
    );

    let load = Arc::new(Load::default());
    let clients: Vec<_> = (0..args.clients)
        .map(|i| {
            let load = Arc::clone(&load);
            std::thread::spawn(move || client(port, &load, i))
        })
        .collect();
    let window = Duration::from_millis(args.window_ms);
    say!("== {} client threads hammering the server", args.clients);

    // An equal window without patching, for comparison.
    std::thread::sleep(Duration::from_millis(200));
    control.ask("RESET")?;
    load.worst_rtt_us.store(0, Ordering::Relaxed);
    std::thread::sleep(window);
    let base_late = worst_late_us(&mut control)?;
    let base_rtt = load.worst_rtt_us.swap(0, Ordering::Relaxed);

    // The window with the apply in its middle.
    control.ask("RESET")?;
    std::thread::sleep(window / 2);
    load.phase.store(2, Ordering::SeqCst);
    // The unprepared server's own code calls compute_fee directly; built
    // with -fno-ipa-ra, those calls assume only the ABI (see README).
    let options = hotpatch::engine::ApplyOptions {
        allow_direct_calls: args.unprepared,
        ..Default::default()
    };
    let applied = hotpatch::engine::apply(pid, &fix, &options)?;
    load.phase.store(1, Ordering::SeqCst);
    std::thread::sleep(window / 2);
    let apply_late = worst_late_us(&mut control)?;
    let apply_rtt = load.worst_rtt_us.swap(0, Ordering::Relaxed);
    say!(
        "== hotpatch apply {pid} fix.so: patch {} in {:.2} ms",
        applied.patch.id,
        applied.elapsed_us as f64 / 1000.0
    );
    for f in &applied.functions {
        let how = match f.mode {
            hotpatch::engine::FlipMode::Live => "live, no thread stopped".to_string(),
            hotpatch::engine::FlipMode::Stopped { stopped_us } => {
                format!("threads stopped for {stopped_us} µs")
            }
            hotpatch::engine::FlipMode::Superseded => "superseded an earlier patch".to_string(),
        };
        say!("   {} -> fix.so ({}, {how})", f.name, f.route);
    }
    say!("   after:   {}", answers(&mut control)?);

    let state = hotpatch::engine::list(pid)?;
    say!(
        "== hotpatch list {pid}: {} patch(es) recorded inside the server",
        state.patches.len()
    );

    load.phase.store(2, Ordering::SeqCst);
    let reverted = hotpatch::engine::revert(pid, hotpatch::engine::Which::All)?;
    load.phase.store(0, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(200));
    load.stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    say!(
        "== hotpatch revert --all {pid}: {} patch(es) reverted",
        reverted.reverted.len()
    );
    say!("   after revert: {}", answers(&mut control)?);

    let requests = load.requests.load(Ordering::Relaxed);
    let failed = load.failed.load(Ordering::Relaxed);
    let wrong = load.wrong.load(Ordering::Relaxed);
    let stale_apply = load.stale_after_apply.load(Ordering::Relaxed);
    let stale_revert = load.stale_after_revert.load(Ordering::Relaxed);
    let stale = stale_apply + stale_revert;
    say!(
        "== {requests} requests: {failed} failed, {wrong} wrong answers, {stale_apply} old answers after apply \
         returned, {stale_revert} new answers after revert returned"
    );
    say!(
        "   worst stall, {} ms window      without patching   with apply",
        args.window_ms
    );
    say!("   server ticker thread lateness  {base_late:>10} µs   {apply_late:>7} µs");
    say!("   client request round trip      {base_rtt:>10} µs   {apply_rtt:>7} µs");
    drop(server);
    if failed + wrong + stale > 0 {
        bail!("the demo saw {failed} failed requests, {wrong} wrong answers and {stale} stale answers");
    }
    say!("== done: no failed request, server stopped");
    Ok(())
}
