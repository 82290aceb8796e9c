//! Section 5, side by side: the same entry write done by hotpatch (live),
//! by a plain ptrace stop-every-thread write, and by gdb in batch mode; and
//! the whole `hotpatch apply` for scale.

use crate::Config;
use crate::common::{Result, Target, Work, median, ms, num, progress, table};
use crate::stall::{self, Hist, Window, window};
use hotpatch::engine::{self, ApplyOptions, Which};
use hotpatch::process::{AllStopped, Mem};
use serde::Serialize;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The entry's new bytes: `jmp -7`, to the `jmp rel32` at entry-5 that the
/// bench puts in the padding (to `work_alt`, in the same image).
pub(crate) const FLIP: [u8; 2] = [0xeb, 0xf9];

#[derive(Debug, Serialize)]
pub struct Method {
    pub method: String,
    pub lateness: Hist,
    pub window_max_us: Vec<f64>,
    pub op_ms: Vec<f64>,
    pub op_median_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct SideRow {
    pub workers: usize,
    pub window_ms: f64,
    pub windows: usize,
    /// Entry bytes before the flip.
    pub original: String,
    pub baseline: Method,
    pub methods: Vec<Method>,
}

#[derive(Debug, Serialize)]
pub struct SideResult {
    pub rows: Vec<SideRow>,
    pub gdb: String,
}

/// A method's figures and the operation that measures it.
type Op<'a> = (&'a mut Method, Box<dyn FnMut() -> Result<()> + 'a>);

fn method(name: &str) -> Method {
    Method {
        method: name.into(),
        lateness: Hist::default(),
        window_max_us: Vec::new(),
        op_ms: Vec::new(),
        op_median_ms: f64::NAN,
    }
}

fn add<T>(m: &mut Method, w: &Window<T>) {
    m.lateness.merge(&w.hist);
    m.window_max_us.push(w.hist.max_us);
    if let Some((_, d)) = &w.op {
        m.op_ms.push(ms(*d));
    }
    m.op_median_ms = median(&m.op_ms);
}

fn e(err: impl std::fmt::Display) -> String {
    err.to_string()
}

/// Write `new` over `old` one byte at a time, in the order that keeps
/// every intermediate state harmless (second byte first on the way in,
/// first byte first on the way out).
fn live_write(mem: &Mem, entry: u64, old: [u8; 2], new: [u8; 2], inward: bool) -> Result<()> {
    let order: [usize; 2] = if inward { [1, 0] } else { [0, 1] };
    for i in order {
        mem.write_expecting(entry + i as u64, &[old[i]], &[new[i]])
            .map_err(e)?;
    }
    Ok(())
}

/// How long one gdb write may take before it counts as hung.
const GDB_LIMIT: Duration = Duration::from_secs(30);
pub(crate) const GDB_HUNG: &str = "gdb hung";

pub(crate) fn gdb_write(pid: i32, entry: u64) -> Result<()> {
    let set = format!(
        "set {{unsigned char[2]}}{entry:#x} = {{{:#x},{:#x}}}",
        FLIP[0], FLIP[1]
    );
    let out = Command::new("gdb")
        .args([
            "-batch",
            "-nx",
            "-iex",
            "set auto-load off",
            "-iex",
            "set debuginfod enabled off",
        ])
        .args(["-p", &pid.to_string(), "-ex", &set])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| format!("cannot run gdb: {err}"))?;
    // gdb has been seen to hang here, waiting forever for one thread of a
    // 16-thread target to report its stop. Killing it detaches it (the
    // kernel resumes the target's threads).
    let mut gdb = out;
    let started = std::time::Instant::now();
    while gdb
        .try_wait()
        .map_err(|err| format!("wait for gdb: {err}"))?
        .is_none()
    {
        if started.elapsed() > GDB_LIMIT {
            let _ = gdb.kill();
            let _ = gdb.wait();
            return Err(format!("{GDB_HUNG} after {GDB_LIMIT:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = gdb
        .wait_with_output()
        .map_err(|err| format!("gdb's output: {err}"))?;
    if !out.status.success() {
        return Err(format!(
            "gdb failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// gdb's version line, or `None` if gdb cannot be run.
pub(crate) fn gdb_version() -> Option<String> {
    Command::new("gdb")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
}

fn alt_calls(t: &mut Target) -> Result<u64> {
    crate::common::field(&t.command("report", Duration::from_secs(60))?, "alt")
}

pub fn run(cfg: &Config, work: &Work) -> Result<SideResult> {
    let b = stall::build(work)?;
    let gdb_found = gdb_version();
    if gdb_found.is_none() {
        progress("side by side: gdb not found, its row is skipped");
    }
    let mut rows = Vec::new();
    for &workers in &cfg.side_threads {
        progress(&format!("side by side: {workers} workers"));
        let mut t = stall::start(&b, workers, 0)?;
        let pid = t.pid();
        let entry = t.ready_address("work")?;
        let alt = t.ready_address("work_alt")?;
        let mem = Mem::open(pid).map_err(e)?;
        let original: [u8; 2] = mem
            .read(entry, 2)
            .map_err(e)?
            .try_into()
            .map_err(|_| "short read of the entry")?;
        if original != [0x90, 0x90] && original != [0x66, 0x90] {
            return Err(format!("unexpected entry bytes {original:02x?} at {entry:#x}"));
        }
        let rel = (alt as i64 - entry as i64) as i32;
        let mut jump = vec![0xe9];
        jump.extend_from_slice(&rel.to_le_bytes());
        std::thread::sleep(Duration::from_millis(100));

        let mut baseline = method("baseline (no patching)");
        let mut apply = method("hotpatch apply (whole: dlopen + flip, live)");
        let mut flip = method("hotpatch live flip (entry bytes only, no stop)");
        let mut stop = method("ptrace stop-every-thread write (AllStopped + write_expecting)");
        let mut gdb = method("gdb -batch -p (attach, write, detach)");
        let mut gdb_hung = false;
        let w = cfg.side_window;
        for round in 0..cfg.side_windows {
            let win: Window<()> = window(&mut t, w, None)?;
            add(&mut baseline, &win);

            let patch = stall::fresh_copy(work, &b.patch, &format!("side_patch_{workers}_{round}.so"))?;
            let mut op = || {
                engine::apply(pid, &patch, &ApplyOptions::default()).map_err(|err| format!("apply: {err}"))
            };
            let win = window(&mut t, w, Some(&mut op))?;
            add(&mut apply, &win);
            engine::revert(pid, Which::All).map_err(|err| format!("revert: {err}"))?;

            // The same flip by each method, to work_alt through the padding
            // (which now holds the route the revert left dormant).
            let padding = mem.read(entry - 5, 5).map_err(e)?;
            mem.write_expecting(entry - 5, &padding, &jump).map_err(e)?;
            let alt_before = alt_calls(&mut t)?;
            let mut ops: Vec<Op<'_>> = vec![
                (
                    &mut flip,
                    Box::new(|| live_write(&mem, entry, original, FLIP, true)),
                ),
                (
                    &mut stop,
                    Box::new(|| {
                        let stopped = AllStopped::stop(pid, Duration::from_secs(10)).map_err(e)?;
                        mem.write_expecting(entry, &original, &FLIP).map_err(e)?;
                        stopped.resume();
                        Ok(())
                    }),
                ),
            ];
            if gdb_found.is_some() && !gdb_hung {
                ops.push((&mut gdb, Box::new(|| gdb_write(pid, entry))));
            }
            for (m, op) in ops.iter_mut() {
                let win = match window(&mut t, w, Some(op.as_mut())) {
                    Ok(win) => win,
                    // A third party's hang is reported, not fatal: nothing
                    // was written, and its row is left out.
                    Err(err) if err.contains(GDB_HUNG) => {
                        progress(&format!("side by side: {err}; gdb's row is left out"));
                        gdb_hung = true;
                        continue;
                    }
                    Err(err) => return Err(err),
                };
                add(m, &win);
                // Check the write is there and took effect, then undo it outside the window.
                let now = mem.read(entry, 2).map_err(e)?;
                if now != FLIP {
                    return Err(format!("{}: entry reads {now:02x?} after the write", m.method));
                }
                live_write(&mem, entry, FLIP, original, false)?;
            }
            drop(ops);
            let alt_after = alt_calls(&mut t)?;
            if alt_after <= alt_before {
                return Err("the flips did not send calls to work_alt".into());
            }
            mem.write_expecting(entry - 5, &jump, &padding).map_err(e)?;
            std::thread::sleep(Duration::from_millis(50));
        }
        rows.push(SideRow {
            workers,
            window_ms: ms(w),
            windows: cfg.side_windows,
            original: format!("{:02x} {:02x}", original[0], original[1]),
            baseline,
            methods: if gdb_found.is_some() && !gdb_hung {
                vec![apply, flip, stop, gdb]
            } else {
                vec![apply, flip, stop]
            },
        });
    }
    Ok(SideResult {
        rows,
        gdb: gdb_found.unwrap_or_else(|| "gdb not installed: its row is skipped".into()),
    })
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() {
        format!("{:.1}×", a / b)
    } else {
        "-".into()
    }
}

pub fn render(r: &SideResult) -> String {
    let mut rows = Vec::new();
    for row in &r.rows {
        let base = &row.baseline.lateness;
        let find = |prefix: &str| row.methods.iter().find(|m| m.method.starts_with(prefix));
        let apply = find("hotpatch apply");
        let flip = find("hotpatch live flip");
        let base_mw = median(&row.baseline.window_max_us);
        for m in std::iter::once(&row.baseline).chain(&row.methods) {
            let over = m.lateness.max_us - base.max_us;
            let mw = median(&m.window_max_us);
            rows.push(vec![
                row.workers.to_string(),
                m.method.clone(),
                num(m.op_median_ms),
                apply.map_or("-".into(), |a| ratio(m.op_median_ms, a.op_median_ms)),
                flip.map_or("-".into(), |f| ratio(m.op_median_ms, f.op_median_ms)),
                num(m.lateness.max_us),
                num(mw),
                num(m.lateness.p999_us),
                format!("{} / {}", num(over), num(mw - base_mw)),
                apply.map_or("-".into(), |a| ratio(m.lateness.max_us, a.lateness.max_us)),
            ]);
        }
    }
    let first = r.rows.first();
    table(
        &format!(
            "Side by side: the same 2-byte entry write (and the whole apply), {} ms windows × {}; \
             {}; lateness in µs",
            first.map_or(0.0, |x| x.window_ms),
            first.map_or(0, |x| x.windows),
            r.gdb
        ),
        &[
            "workers",
            "method",
            "op ms (median)",
            "time vs hotpatch apply",
            "time vs hotpatch flip",
            "worst",
            "median window worst",
            "p99.9",
            "over baseline: worst / median window worst",
            "worst vs hotpatch apply",
        ],
        &rows,
    )
}
