//! Making the call region before the target has any page of ours: one
//! run of a cave stub (see the parent module's docs), and unmapping a
//! region the same way.

use super::*;

/// Run the cave bootstrap once at `layout.base`: `mmap` RW, `mprotect` the
/// code page RX, marker. `CallFailed` when the mmap failed (try elsewhere).
pub(super) fn bootstrap(
    mem: &Mem,
    layout: &Layout,
    timeouts: Timeouts,
    choice: Choice,
) -> Result<(), ProcessError> {
    let pid = mem.pid();
    let op = CaveOp {
        nr: NR_MMAP,
        args: [
            layout.base,
            layout.size(),
            PROT_READ | PROT_WRITE,
            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE,
            u64::MAX,
            0,
        ],
        then: Some((NR_MPROTECT, [layout.base, stub::CODE_SIZE, PROT_READ | PROT_EXEC])),
        marker: Some(layout.frame() + frame::BOOT),
    };
    let marker_at = layout.frame() + frame::BOOT;
    let probe = || {
        mem.read_u64(marker_at)
            .ok()
            .filter(|m| *m as u32 == stub::BOOT_MAGIC)
    };
    match run_cave(mem, &op, timeouts, choice, &probe)? {
        Some(m) if m >> 32 == 0 => Ok(()),
        Some(m) => {
            // Mapped, but it cannot hold code: nowhere else will either
            // (MDWE and LSMs refuse per process), so unmap it and stop.
            let errno = -((m >> 32) as u32 as i32);
            let refused = ProcessError::Unsupported {
                pid,
                what: format!(
                    "mprotect({:#x}, PROT_READ|PROT_EXEC) of the new remote-call region failed: {}: \
                     the process may not make memory executable (MDWE, set with prctl \
                     PR_SET_MDWE, or an LSM policy)",
                    layout.base,
                    std::io::Error::from_raw_os_error(errno)
                ),
            };
            Err(unmap_failed(mem, layout, timeouts, choice, refused))
        }
        None => Err(ProcessError::CallFailed {
            pid,
            what: format!(
                "mmap({:#x}, {:#x}) for the remote-call region",
                layout.base,
                layout.size()
            ),
            detail: "no marker: the address was taken, or mmap is refused".into(),
        }),
    }
}

/// The session stub, written into the code page of a freshly bootstrapped
/// region, and the frame marked idle.
pub(super) fn install_stub(mem: &Mem, layout: &Layout) -> Result<SessionStub, ProcessError> {
    let stub = stub::session_stub(layout).map_err(|e| ProcessError::Unsupported {
        pid: mem.pid(),
        what: format!("assembling the stub: {e}"),
    })?;
    let zeros = vec![0u8; stub.bytes.len()];
    mem.write_expecting(layout.code(), &zeros, &stub.bytes)?;
    mem.write_u32(layout.frame() + frame::DONE, 1)?;
    Ok(stub)
}

/// `munmap` of `region` run from a cave (code cannot unmap the page it
/// runs from); done once the region is gone from the maps.
pub(super) fn unmap_through_cave(
    mem: &Mem,
    region: Range<u64>,
    timeouts: Timeouts,
    choice: Choice,
) -> Result<(), ProcessError> {
    let pid = mem.pid();
    let op = CaveOp {
        nr: NR_MUNMAP,
        args: [region.start, region.end - region.start, 0, 0, 0, 0],
        then: None,
        marker: None,
    };
    let gone = || {
        let maps = crate::process::Process::open(pid).and_then(|p| p.maps()).ok()?;
        (!maps.iter().any(|m| m.start < region.end && region.start < m.end)).then_some(0)
    };
    match run_cave(mem, &op, timeouts, choice, &gone)? {
        Some(_) => Ok(()),
        None => Err(ProcessError::CallFailed {
            pid,
            what: format!("munmap({:#x}, {:#x})", region.start, region.end - region.start),
            detail: "the region is still mapped".into(),
        }),
    }
}

/// A region was mapped and then `error` stopped its set-up: unmap it, so
/// that the process's maps are as they were, and return `error` saying
/// so (or that the region stays, if unmapping failed too).
pub(super) fn unmap_failed(
    mem: &Mem,
    layout: &Layout,
    timeouts: Timeouts,
    choice: Choice,
    error: ProcessError,
) -> ProcessError {
    let pid = mem.pid();
    let region = layout.base..layout.end();
    let what = match unmap_through_cave(mem, region.clone(), timeouts, choice) {
        Ok(()) => "was unmapped again: nothing is left in the process".to_string(),
        Err(e) => format!(
            "could not be unmapped ({e}): {:#x}-{:#x} stays mapped, unused",
            region.start, region.end
        ),
    };
    ProcessError::Unsupported {
        pid,
        what: format!(
            "{}; the call region {what}",
            error.to_string().trim_start_matches(&format!("process {pid}: "))
        ),
    }
}

/// Run `op` from a cave on some thread; `probe` says whether it succeeded
/// (and with what). Returns once the thread has left the cave and the cave
/// is zero again; `None` if the thread left without `probe` seeing success.
pub(super) fn run_cave(
    mem: &Mem,
    op: &CaveOp,
    timeouts: Timeouts,
    mut choice: Choice,
    probe: &dyn Fn() -> Option<u64>,
) -> Result<Option<u64>, ProcessError> {
    let pid = mem.pid();
    // A thread slow to stop is lent a priority until it left the cave.
    choice.lend = true;
    let t0 = Instant::now();
    let maps = crate::process::Process::open(pid)?.maps()?;
    let cave = find_cave(pid, mem, &maps, stub::CAVE_MAX)?;
    tracing::debug!(pid, cave, us = t0.elapsed().as_micros() as u64, "cave found");
    let mut written: Option<Vec<u8>> = None;
    let mut asm_err = None;
    let mut committed = false;
    let result = hijack(
        pid,
        mem,
        timeouts,
        &mut choice,
        Some(&maps),
        &mut committed,
        &mut |regs, maps, _| {
            // rflags go to rsp − 264, under the red zone.
            if !writable(maps, regs.rsp.wrapping_sub(stub::CAVE_STACK_DROP + 8), 8) {
                return None;
            }
            let (rip, rax) = stub::resume_point(regs.rip, regs.rax, regs.orig_rax);
            let restore = CaveRestore {
                rax,
                rcx: regs.rcx,
                r11: regs.r11,
                rdi: regs.rdi,
                rsi: regs.rsi,
                rdx: regs.rdx,
                r10: regs.r10,
                r8: regs.r8,
                r9: regs.r9,
                rip,
            };
            let bytes = match stub::cave_stub(cave, op, &restore) {
                Ok(b) => b,
                Err(e) => {
                    asm_err = Some(e.to_string());
                    return None;
                }
            };
            // Claim the cave: compare-and-swap on zeros (another tool may be
            // bootstrapping too).
            if let Err(e) = mem.write_expecting(cave, &vec![0; bytes.len()], &bytes) {
                tracing::debug!(pid, cave, error = %e, "cave taken");
                return None;
            }
            written = Some(bytes);
            let mut new = *regs;
            new.rip = cave;
            new.rax = op.nr;
            new.rdi = op.args[0];
            new.rsi = op.args[1];
            new.rdx = op.args[2];
            new.r10 = op.args[3];
            new.r8 = op.args[4];
            new.r9 = op.args[5];
            new.orig_rax = u64::MAX;
            Some(Hijack {
                stack: None,
                writes: Vec::new(),
                regs: new,
                lend_priority: None,
            })
        },
    );
    // A priority lent early is held until the thread is out of the cave
    // (given back when this returns, whatever the way).
    let (tid, _loan) = match result {
        Ok(took) => took,
        Err(e) => {
            // If the cave was written, it stays written: whether the thread
            // was already sent into it (SETREGS done, DETACH failed) is not
            // known here, and dead code in padding is harmless.
            if let Some(a) = asm_err {
                return Err(ProcessError::Unsupported {
                    pid,
                    what: format!("assembling the cave stub: {a}"),
                });
            }
            return Err(e);
        }
    };
    let Some(bytes) = written else {
        return Err(ProcessError::NoUsableThread {
            pid,
            why: "no thread to run the bootstrap".into(),
        });
    };
    let cave_range = cave..cave + bytes.len() as u64;
    // Wait for success (or for the thread to have left the cave without
    // it: the system call failed).
    let start = Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(1));
    let marker = loop {
        if let Some(m) = probe() {
            break Some(m);
        }
        if start.elapsed() > Duration::from_millis(200) && left(pid, tid, &cave_range, Duration::ZERO)? {
            // Out of the cave and no success: look once more (it may have
            // landed in between), else the call failed.
            break probe();
        }
        if start.elapsed() >= timeouts.call {
            return Err(ProcessError::Timeout {
                pid,
                tid,
                what: "waiting for the cave stub (the cave stays written)".into(),
                after: timeouts.call,
            });
        }
        backoff.pause();
    };
    // The marker is written before the last few instructions: wait until
    // the thread is out, then put the cave back.
    if !left(pid, tid, &cave_range, timeouts.call)? {
        return Err(ProcessError::Timeout {
            pid,
            tid,
            what: "waiting for the thread to leave the cave (it stays written)".into(),
            after: timeouts.call,
        });
    }
    mem.write_expecting(cave, &bytes, &vec![0; bytes.len()])?;
    tracing::debug!(pid, us = t0.elapsed().as_micros() as u64, "cave op done");
    Ok(marker)
}

/// Whether thread `tid` has left `range` (or exited), waiting up to
/// `timeout`. First from `/proc/PID/task/TID/syscall` (a blocked thread's
/// pc, no interruption); a thread that keeps running is interrupted and
/// its rip read.
pub(super) fn left(pid: i32, tid: i32, range: &Range<u64>, timeout: Duration) -> Result<bool, ProcessError> {
    let start = Instant::now();
    let mut polls = 0u32;
    loop {
        let info = match threads::thread_info(pid, tid) {
            Ok(i) => i,
            Err(ProcessError::NoSuchThread { .. } | ProcessError::NoSuchProcess { .. }) => return Ok(true),
            Err(e) => return Err(e),
        };
        if matches!(info.state, 'Z' | 'X') {
            return Ok(true);
        }
        match info.syscall.pc() {
            Some(pc) if !range.contains(&pc) && info.syscall != SyscallState::Unknown => return Ok(true),
            Some(_) => {}
            None => {
                polls += 1;
                if polls >= 3 || timeout.is_zero() {
                    // Running: look at its rip.
                    let mut t = match Traced::seize(pid, tid) {
                        Ok(t) => t,
                        Err(ProcessError::NoSuchThread { .. }) => return Ok(true),
                        Err(e) => return Err(e),
                    };
                    match t.interrupt(Duration::from_secs(2)) {
                        Ok(()) => {}
                        Err(ProcessError::Exited { .. }) => return Ok(true),
                        Err(e) => return Err(e),
                    }
                    let rip = t.regs()?.rip;
                    t.detach()?;
                    if !range.contains(&rip) {
                        return Ok(true);
                    }
                    polls = 0;
                }
            }
        }
        if start.elapsed() >= timeout {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// A code cave: at least `need` zero bytes after the last file byte of an
/// executable segment of a mapped ELF image, inside its last page, covered
/// by no symbol. Returns its address (16-aligned).
pub fn find_cave(pid: i32, mem: &Mem, maps: &[MapEntry], need: usize) -> Result<u64, ProcessError> {
    for img in crate::process::maps::images(maps, pid)
        .iter()
        .filter(|i| i.executable)
    {
        let Ok(image) = Image::open(&img.open_path) else {
            continue;
        };
        let bias = img.base.wrapping_sub(image.link_base());
        for seg in image.segments().iter().filter(|s| s.executable) {
            let file_end = bias.wrapping_add(seg.vaddr + seg.filesz);
            let page_end = file_end.next_multiple_of(PAGE);
            // Leave a little distance after the last code byte.
            let first = (file_end + 16).next_multiple_of(16);
            if first + need as u64 > page_end {
                continue;
            }
            let in_exec_mapping = maps
                .iter()
                .any(|m| m.executable && m.inode != 0 && m.start <= first && page_end <= m.end);
            if !in_exec_mapping {
                continue;
            }
            let (lo, hi) = (first.wrapping_sub(bias), page_end.wrapping_sub(bias));
            let covered = image
                .functions()
                .iter()
                .any(|f| f.address < hi && f.address + f.size.max(1) > lo);
            if covered {
                continue;
            }
            let Ok(bytes) = mem.read(first, (page_end - first) as usize) else {
                continue;
            };
            // The first all-zero window, 16-aligned, with 16 zero bytes
            // before it (a cave left behind by a killed tool is skipped).
            let mut at = 0usize;
            while at + need <= bytes.len() {
                let guard = at.saturating_sub(16);
                match bytes[guard..at + need].iter().rposition(|&b| b != 0) {
                    None => return Ok(first + at as u64),
                    Some(nz) => at = (guard + nz + 1 + 16).next_multiple_of(16),
                }
            }
        }
    }
    Err(ProcessError::Unsupported {
        pid,
        what: format!("no code cave of {need} zero bytes in any executable mapping"),
    })
}
