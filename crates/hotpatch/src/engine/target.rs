//! The pieces of a target process the engine works with: the lock that
//! keeps two tools apart, the image being patched, the state region, and
//! the scratch pages (slots, trampolines) near the image.

use super::EngineError;
use crate::image::ImageFile;
use crate::patchfile::TargetImage;
use crate::process::{MapEntry, MappedImage, Mem, Placement, Process, Remote, lock};
use crate::state::{self, Cursor, ScratchRecord, State, StateError};

const PROT_READ: u64 = 1;
const PROT_WRITE: u64 = 2;
const PROT_EXEC: u64 = 4;
const MAP_PRIVATE: u64 = 2;
const MFD_CLOEXEC: u64 = 1;
const NR_CLOSE: u64 = 3;
const NR_MMAP: u64 = 9;
const NR_MPROTECT: u64 = 10;
const NR_MUNMAP: u64 = 11;
const NR_FTRUNCATE: u64 = 77;
const NR_MEMFD_CREATE: u64 = 319;

/// Slots per data page set; dispatchers and trampolines per code page set
/// (pages no trampoline was written to cost no memory).
const DATA_SCRATCH: u64 = 64 * 1024;
const CODE_SCRATCH: u64 = 64 * 1024;
/// `store64_many(pairs, n)`: for each of `n` (address, value) pairs at
/// `pairs`, one aligned 8-byte store — many live slots in one remote call.
/// ```text
/// l: mov rax,[rdi]; mov rdx,[rdi+8]; mov [rax],rdx; add rdi,16; dec rsi; jnz l; ret
/// ```
pub const STORE64_MANY: [u8; 20] = [
    0x48, 0x8b, 0x07, 0x48, 0x8b, 0x57, 0x08, 0x48, 0x89, 0x10, 0x48, 0x83, 0xc7, 0x10, 0x48, 0xff, 0xce,
    0x75, 0xed, 0xc3,
];
/// Code pages start with [`STORE64_MANY`], padded with int3.
const CODE_HEADER: u64 = 32;
/// (address, value) pairs per `store64_many` call: what fits the call
/// region's scratch.
const PAIRS_PER_CALL: usize = 256;
/// Keep scratch this far inside the ±2 GiB reach.
const REACH: u64 = (1 << 31) - (1 << 24);

/// An exclusive lock per target process, held while a tool changes it.
/// Released by the kernel if the tool dies (see [`crate::process::lock`]).
pub struct Lock {
    _lock: lock::Lock,
}

impl Lock {
    pub fn take(pid: i32) -> Result<Lock, EngineError> {
        match lock::lock_process(pid)? {
            lock::Taken::Locked(l) => Ok(Lock { _lock: l }),
            lock::Taken::Busy(path) => Err(EngineError::Busy {
                pid,
                lock: path.display().to_string(),
            }),
        }
    }
}

/// The image a patch targets, as mapped in the process.
pub struct TargetImageInProcess {
    pub mapped: MappedImage,
    pub image: ImageFile,
    pub bias: u64,
}

/// Find the patch's target image among the process's mappings: by path,
/// file name or soname; the main executable when the patch does not say;
/// the image mapped at `mapped_path` exactly when that is given.
pub fn target_image(
    process: &Process,
    target: Option<&TargetImage>,
    mapped_path: Option<&str>,
) -> Result<TargetImageInProcess, EngineError> {
    let pid = process.pid();
    let images = process.mapped_images()?;
    let exe = std::fs::read_link(process.proc_path("exe"))
        .ok()
        .map(|p| p.display().to_string().trim_end_matches(" (deleted)").to_string());
    let file_name = |p: &str| p.rsplit('/').next().unwrap_or(p).to_string();
    // Headers only: the planner reads the rest as it needs it.
    let open =
        |m: &MappedImage| -> Result<ImageFile, EngineError> { Ok(ImageFile::open(&m.path, &m.open_path)?) };
    let wanted = mapped_path.or(target.map(|t| t.image.as_str()));
    let mut found = None;
    for m in &images {
        let hit = match (mapped_path, wanted) {
            (Some(p), _) => m.path == p,
            (None, None) => exe.as_deref() == Some(m.path.as_str()),
            (None, Some(w)) => m.path == w || file_name(&m.path) == w,
        };
        if hit {
            found = Some((m.clone(), open(m)?));
            break;
        }
    }
    if found.is_none()
        && mapped_path.is_none()
        && let Some(w) = wanted
    {
        for m in images.iter().filter(|m| m.executable) {
            if let Ok(image) = open(m)
                && image.soname() == Some(w)
            {
                found = Some((m.clone(), image));
                break;
            }
        }
    }
    let Some((mapped, image)) = found else {
        return Err(EngineError::ImageNotMapped {
            pid,
            image: wanted.map_or_else(
                || exe.unwrap_or_else(|| "the main executable".into()),
                str::to_string,
            ),
            mapped: images
                .iter()
                .filter(|m| m.executable)
                .map(|m| m.path.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    let bias = mapped.base.wrapping_sub(image.link_base());
    Ok(TargetImageInProcess { mapped, image, bias })
}

/// The state region in the process: where, and its cursor.
///
/// The record is mapped private (`MAP_PRIVATE`) and read-only: the tool
/// writes it through `/proc/PID/mem`, which copies each page it writes
/// into the process, so a child forked after a patch owns a copy of the
/// record that it and its parent then change independently, as they do
/// their code. An older hotpatch mapped it shared (one record for every
/// process forked from the one patched); such a record is read as it is,
/// and replaced by a private copy before the first change.
pub struct StateRegion {
    pub address: u64,
    pub cursor: Option<Cursor>,
    /// A shared record (start, length) still to replace by a private one.
    shared: Option<(u64, u64)>,
}

fn region_read(mem: &Mem, address: u64) -> impl FnMut(usize, usize) -> Result<Vec<u8>, StateError> + '_ {
    move |offset, len| {
        mem.read(address + offset as u64, len)
            .map_err(|e| StateError::Corrupt(e.to_string()))
    }
}

impl StateRegion {
    /// The record mappings in `maps` (named after [`state::MEMFD_NAME`],
    /// of the size the tool maps): the private one, and a shared one (an
    /// older hotpatch's, or what an interrupted replacement left).
    fn mappings(maps: &[MapEntry]) -> (Option<&MapEntry>, Option<&MapEntry>) {
        let name = format!("/memfd:{}", state::MEMFD_NAME);
        let named = |m: &&MapEntry| {
            m.path.as_deref() == Some(name.as_str())
                && m.readable
                && m.end.checked_sub(m.start) == Some(state::REGION_SIZE as u64)
        };
        (
            maps.iter().filter(named).find(|m| m.private),
            maps.iter().filter(named).find(|m| !m.private),
        )
    }

    /// Read the recorded state, if the process has a region.
    pub fn find(pid: i32, maps: &[MapEntry]) -> Result<Option<(StateRegion, State)>, EngineError> {
        let (private, shared) = Self::mappings(maps);
        let Some(m) = private.or(shared) else {
            return Ok(None);
        };
        let mem = Mem::open(pid)?;
        let read_at = |m: &MapEntry| {
            state::read(state::REGION_SIZE, region_read(&mem, m.start)).map_err(EngineError::state(pid))
        };
        let (mut state, cursor) = read_at(m)?;
        if m.private
            && cursor.is_none()
            && let Some(s) = shared
        {
            // A replacement of the shared record cut short before the
            // private one was written: the shared one still holds the truth.
            state = read_at(s)?.0;
        }
        // The process may have written anything there.
        state.check().map_err(EngineError::state(pid))?;
        Ok(Some((
            StateRegion {
                address: m.start,
                cursor,
                shared: shared.map(|s| (s.start, s.end.saturating_sub(s.start))),
            },
            state,
        )))
    }

    /// The region a program made at `address` (see [`StateRegion::create`]).
    pub fn created(address: u64) -> StateRegion {
        StateRegion {
            address,
            cursor: None,
            shared: None,
        }
    }

    /// Create the region: a sparse memfd mapped private and read-only. It
    /// reads as empty (all zeros) until its first [`StateRegion::write`].
    pub fn create(remote: &mut Remote) -> Result<StateRegion, EngineError> {
        let mut name = state::MEMFD_NAME.as_bytes().to_vec();
        name.push(0);
        let name_at = remote.write_scratch(&name)?;
        let fd = remote.syscall_ok("memfd_create", NR_MEMFD_CREATE, &[name_at, MFD_CLOEXEC])?;
        let size = state::REGION_SIZE as u64;
        let mapped = remote
            .syscall_ok("ftruncate", NR_FTRUNCATE, &[fd, size])
            .and_then(|_| {
                remote.syscall_ok(
                    "mmap of the state region",
                    NR_MMAP,
                    &[0, size, PROT_READ, MAP_PRIVATE, fd, 0],
                )
            });
        let _ = remote.syscall(NR_CLOSE, &[fd]);
        Ok(StateRegion {
            address: mapped?,
            cursor: None,
            shared: None,
        })
    }

    /// If the record is (or a leftover is) a shared mapping made by an
    /// older hotpatch: copy `state` into a private region (new, or one a
    /// cut-short replacement left unwritten), then unmap the shared one. A
    /// tool killed in between leaves both; the private one is read from
    /// then on once written, the shared one until then.
    pub fn make_private(&mut self, remote: &mut Remote, state: &State) -> Result<(), EngineError> {
        let Some((start, len)) = self.shared else {
            return Ok(());
        };
        if start == self.address {
            *self = StateRegion::create(remote)?;
        }
        if self.cursor.is_none() {
            self.write(remote.mem(), state)?;
        }
        remote.syscall_ok("munmap of the shared state region", NR_MUNMAP, &[start, len])?;
        self.shared = None;
        tracing::debug!(
            pid = remote.pid(),
            start,
            "shared state region replaced by a private one"
        );
        Ok(())
    }

    /// Replace the recorded state: the inactive half, then the active flag.
    pub fn write(&mut self, mem: &Mem, state: &State) -> Result<(), EngineError> {
        let (writes, cursor) =
            state::encode(state::REGION_SIZE, self.cursor, state).map_err(EngineError::state(mem.pid()))?;
        for (offset, bytes) in writes {
            mem.write(self.address + offset as u64, &bytes)?;
        }
        self.cursor = Some(cursor);
        Ok(())
    }
}

fn within_reach(record: &ScratchRecord, near: u64) -> bool {
    record.base.abs_diff(near) < REACH && record.base.saturating_add(record.size).abs_diff(near) < REACH
}

/// Hand out `bytes` of scratch (8-aligned) within reach of `near` from
/// page sets already mapped; `None` if none has room.
fn take_scratch(records: &mut [ScratchRecord], near: u64, executable: bool, bytes: u64) -> Option<u64> {
    let r = records.iter_mut().find(|r| {
        r.executable == executable && within_reach(r, near) && r.used.saturating_add(bytes) <= r.size
    })?;
    let at = r.base.saturating_add(r.used);
    r.used = r.used.saturating_add(bytes.next_multiple_of(8));
    Some(at)
}

/// Scratch one apply asks for: `bytes` within reach of `near`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScratchNeed {
    pub near: u64,
    pub executable: bool,
    pub bytes: u64,
}

/// The page sets to map so that every need finds room (none if the
/// recorded ones have it), each at a free spot of `maps` within reach;
/// as records of nothing handed out yet (a code set's header counted).
/// They are mapped at exactly these addresses (`MAP_FIXED_NOREPLACE`)
/// before [`scratch`] hands any of it out.
pub fn plan_scratch(
    pid: i32,
    state: &State,
    needs: &[ScratchNeed],
    maps: &[MapEntry],
) -> Result<Vec<ScratchRecord>, EngineError> {
    let mut sim = state.scratch.clone();
    let mut planned: Vec<ScratchRecord> = Vec::new();
    let mut taken: Vec<MapEntry> = maps.to_vec();
    for need in needs {
        if take_scratch(&mut sim, need.near, need.executable, need.bytes).is_some() {
            continue;
        }
        let (size, used) = if need.executable {
            (CODE_SCRATCH, CODE_HEADER)
        } else {
            (DATA_SCRATCH, 0)
        };
        let record = crate::process::remote::free_spots(&taken, size, Placement::Near(need.near))
            .into_iter()
            .map(|base| ScratchRecord {
                base,
                size,
                used,
                executable: need.executable,
            })
            .find(|r| within_reach(r, need.near))
            .ok_or_else(|| EngineError::Failed {
                pid,
                what: format!(
                    "no free {size:#x}-byte spot within reach of {:#x} for scratch",
                    need.near
                ),
            })?;
        taken.push(MapEntry {
            start: record.base,
            end: record.base + size,
            readable: true,
            writable: false,
            executable: false,
            private: true,
            offset: 0,
            inode: 0,
            path: None,
            deleted: false,
        });
        taken.sort_by_key(|m| m.start);
        planned.push(record.clone());
        sim.push(record);
        if take_scratch(&mut sim, need.near, need.executable, need.bytes).is_none() {
            return Err(EngineError::Failed {
                pid,
                what: format!("{} bytes of scratch do not fit a page set", need.bytes),
            });
        }
    }
    Ok(planned)
}

/// The first bytes of a code page set: [`STORE64_MANY`], padded with int3.
pub fn code_header() -> Vec<u8> {
    let mut header = vec![0xcc; CODE_HEADER as usize];
    header[..STORE64_MANY.len()].copy_from_slice(&STORE64_MANY);
    header
}

/// Hand out `bytes` of scratch (8-aligned) within reach of `near`: data
/// (slots, read-write) or code (trampolines, read+execute). Maps a new page
/// set when none has room (and `remote` is given: else that is an error,
/// the sets having been planned and mapped beforehand), and records it in
/// `state`.
pub fn scratch(
    pid: i32,
    state: &mut State,
    remote: Option<&mut Remote>,
    near: u64,
    executable: bool,
    bytes: u64,
) -> Result<u64, EngineError> {
    if let Some(at) = take_scratch(&mut state.scratch, near, executable, bytes) {
        return Ok(at);
    }
    let Some(remote) = remote else {
        return Err(EngineError::Failed {
            pid,
            what: format!("no scratch mapped within reach of {near:#x} (planned beforehand)"),
        });
    };
    let record = if executable {
        let base = remote.mmap(Placement::Near(near), CODE_SCRATCH, PROT_READ | PROT_WRITE)?;
        let header = code_header();
        let ready = remote.mem().write(base, &header).and_then(|()| {
            remote.syscall_ok(
                "mprotect of the trampoline page",
                NR_MPROTECT,
                &[base, CODE_SCRATCH, PROT_READ | PROT_EXEC],
            )
        });
        if let Err(e) = ready {
            // Recorded nowhere yet: unmap it, leave the maps as they were.
            let _ = remote.syscall(NR_MUNMAP, &[base, CODE_SCRATCH]);
            return Err(e.into());
        }
        ScratchRecord {
            base,
            size: CODE_SCRATCH,
            used: CODE_HEADER,
            executable: true,
        }
    } else {
        let base = remote.mmap(Placement::Near(near), DATA_SCRATCH, PROT_READ | PROT_WRITE)?;
        ScratchRecord {
            base,
            size: DATA_SCRATCH,
            used: 0,
            executable: false,
        }
    };
    if !within_reach(&record, near) {
        return Err(EngineError::Failed {
            pid: remote.pid(),
            what: format!(
                "scratch mapped at {:#x} is out of reach of {near:#x}",
                record.base
            ),
        });
    }
    let at = record.base + record.used;
    let mut record = record;
    record.used += bytes.next_multiple_of(8);
    state.scratch.push(record);
    Ok(at)
}

/// The [`STORE64_MANY`] routine in the process, mapping a code page if needed.
pub fn store64_many(state: &mut State, remote: &mut Remote, near: u64) -> Result<u64, EngineError> {
    if let Some(r) = state.scratch.iter().find(|r| r.executable) {
        return Ok(r.base);
    }
    let at = scratch(remote.pid(), state, Some(remote), near, true, 0)?;
    Ok(at - CODE_HEADER)
}

/// Every slot of `stores` is an 8-aligned word of writable, non-executable
/// memory in `maps` (the record names them, and the process can write
/// the record).
fn slots_writable(pid: i32, maps: &[MapEntry], stores: &[(u64, u64)]) -> Result<(), EngineError> {
    for &(slot, _) in stores {
        let ok = slot % 8 == 0
            && maps.iter().any(|m| {
                m.writable
                    && !m.executable
                    && slot >= m.start
                    && slot.checked_add(8).is_some_and(|e| e <= m.end)
            });
        if !ok {
            return Err(EngineError::Failed {
                pid,
                what: format!("the slot at {slot:#x} is not in writable data memory; no slot changed"),
            });
        }
    }
    Ok(())
}

/// Whether a program may store `stores` as they are: every slot writable
/// now (a page left read-only needs [`store_slots`]' repair first).
pub fn check_slots(remote: &Remote, stores: &[(u64, u64)]) -> Result<(), EngineError> {
    let maps = Process::open(remote.pid())?.maps()?;
    slots_writable(remote.pid(), &maps, stores)
}

/// Change live slots, each with one aligned 8-byte store inside the
/// process: [`PAIRS_PER_CALL`] slots per remote call.
pub fn store_slots(state: &mut State, remote: &mut Remote, stores: &[(u64, u64)]) -> Result<(), EngineError> {
    let Some(&(first, _)) = stores.first() else {
        return Ok(());
    };
    // The slots come from the record, which the process can write: store
    // only into 8-aligned words of writable, non-executable memory. A page
    // of our own data scratch found read-only was left so by a tool killed
    // inside `sync_cores` (between its two `mprotect`s): make it writable
    // again first, or the store would fault in the target.
    let mut maps = Process::open(remote.pid())?.maps()?;
    let left_read_only = |maps: &[MapEntry], slot: u64| {
        let page = slot & !0xfff;
        let ours = state
            .scratch
            .iter()
            .any(|r| !r.executable && page >= r.base && page < r.base.saturating_add(r.size));
        ours && maps
            .iter()
            .any(|m| m.readable && !m.writable && !m.executable && page >= m.start && page < m.end)
    };
    let mut repaired = false;
    for &(slot, _) in stores {
        if slot % 8 == 0 && left_read_only(&maps, slot) {
            remote.syscall_ok(
                "mprotect of a scratch page left read-only",
                NR_MPROTECT,
                &[slot & !0xfff, 4096, PROT_READ | PROT_WRITE],
            )?;
            repaired = true;
        }
    }
    if repaired {
        maps = Process::open(remote.pid())?.maps()?;
    }
    slots_writable(remote.pid(), &maps, stores)?;
    let routine = store64_many(state, remote, first)?;
    for chunk in stores.chunks(PAIRS_PER_CALL) {
        let pairs: Vec<u8> = chunk
            .iter()
            .flat_map(|(slot, value)| slot.to_le_bytes().into_iter().chain(value.to_le_bytes()))
            .collect();
        let at = remote.write_scratch(&pairs)?;
        remote.call(routine, &[at, chunk.len() as u64])?;
    }
    Ok(())
}

/// Serialise every core running the process after code changed, so that
/// from now on every call runs the new bytes.
///
/// `membarrier(PRIVATE_EXPEDITED_SYNC_CORE)` where the process is
/// registered for it. Registering blocks on an RCU grace period, measured
/// here from 25 ms to over 10 s on a loaded 2-core machine, so it is never
/// done: instead, revoking write access to one of our scratch pages (and
/// giving it back) makes the kernel shoot down that page's TLB entries with
/// an IPI to every CPU running the process, and the `iret` back to user
/// mode serialises each of them — the mechanism membarrier replaced. A
/// thread not running now passes through a context switch (a CR3 write,
/// serialising) before it runs again. If neither works, the flip still
/// happened; a core may run the old bytes until its next serialising event.
pub fn sync_cores(remote: &mut Remote, state: &State) {
    let maps = Process::open(remote.pid())
        .and_then(|p| p.maps())
        .unwrap_or_default();
    let page = shootdown_page(state, &maps);
    if page.is_none() {
        tracing::debug!("no scratch page for a TLB shootdown; membarrier only");
    }
    // One trip: membarrier, else the shootdown (see `program::Op::SyncCores`).
    let (mut program, _) = remote.program();
    let step = program.sync_cores(page.unwrap_or(0));
    let outcome = remote.start(&program).and_then(|run| {
        let (status, remote) = run.finish();
        status.and_then(|s| match s.gave_up {
            Some(_) => Ok(u64::MAX),
            None => remote.program_result(step),
        })
    });
    match outcome {
        Ok(0) => {}
        Ok(r) => tracing::warn!(
            "serialising the cores failed ({}); a core may run the old bytes until its next serialising event",
            std::io::Error::from_raw_os_error(-(r as i64) as i32)
        ),
        Err(e) => tracing::warn!("serialising the cores: {e}"),
    }
}

/// Whether `[start, end)` lies in one mapping of `maps` of the kind the
/// tool maps for data: anonymous, private, read-write, not executable.
pub fn our_data(maps: &[MapEntry], start: u64, end: u64) -> bool {
    maps.iter().any(|m| {
        m.start <= start
            && end <= m.end
            && m.readable
            && m.writable
            && !m.executable
            && m.private
            && m.inode == 0
            && m.path.is_none()
    })
}

/// A data page the tool mapped (anonymous, private, read-write, recorded
/// as our scratch) whose protection a TLB shootdown may flip: never
/// anything else, whatever the record says.
pub fn shootdown_page(state: &State, maps: &[MapEntry]) -> Option<u64> {
    let ours = |base: u64| {
        base.checked_add(4096)
            .is_some_and(|end| our_data(maps, base, end))
    };
    state
        .scratch
        .iter()
        .filter(|r| !r.executable && r.base % 4096 == 0)
        .map(|r| r.base)
        .find(|&base| ours(base))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::format_instruction;

    #[test]
    fn store_routine_decodes_as_documented() {
        let text = |code: &[u8]| -> Vec<String> {
            let mut d = iced_x86::Decoder::with_ip(64, code, 0, 0);
            (&mut d).into_iter().map(|i| format_instruction(&i)).collect()
        };
        assert_eq!(
            text(&STORE64_MANY),
            [
                "mov rax,[rdi]",
                "mov rdx,[rdi+8]",
                "mov [rax],rdx",
                "add rdi,10h",
                "dec rsi",
                "jne short 0", // back to the start
                "ret"
            ]
        );
    }
}
