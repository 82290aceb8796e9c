//! What is applied to a process, as recorded inside the process itself
//! (DESIGN.md §5), so that any later run of the tool — or another tool
//! instance — reads one truth.
//!
//! The record lives in a region of the target's memory (a named memfd
//! mapping, `/memfd:hotpatch-state`, visible in `/proc/PID/maps`). Layout:
//!
//! ```text
//! 0      8 bytes  magic "HOTPATCH"
//! 8      u32      layout version (1)
//! 12     u8       active half (0 or 1)
//! 16     half 0:  u64 generation, u32 length, JSON[length]
//! 16+H   half 1:  the same
//! ```
//!
//! An update writes the inactive half completely, then flips the one
//! "active" byte: a tool killed mid-update leaves the previous state
//! intact. A region whose header is all zeros was never written (a tool
//! killed right after mapping it): it reads as empty, and its first update
//! writes half 0 and then, last, the header. This module only encodes and
//! decodes; the engine does the I/O.

use crate::plan::{EntryFlip, Overwrite, Route, Write};
use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 8] = b"HOTPATCH";
pub const LAYOUT_VERSION: u32 = 1;
/// Offset of the active-half byte.
pub const ACTIVE_OFFSET: usize = 12;
const HEADER: usize = 16;
/// The name of the memfd that holds the record.
pub const MEMFD_NAME: &str = "hotpatch-state";

/// One version of a function: which patch, and where its code is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub patch: u32,
    pub replacement: u64,
}

/// A patched function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionRecord {
    /// The image (path as mapped) and the function's name in it.
    pub image: String,
    pub name: String,
    /// The function's entry in the process.
    pub entry: u64,
    pub slot: u64,
    /// How calls reach the replacement (records without it are prepared).
    #[serde(default)]
    pub route: Route,
    /// Writes that undo the flip: first the entry's (what `revert`
    /// writes; see [`FunctionRecord::entry_undo`]), then the route's:
    /// padding, trampoline, dispatcher (never undone once an entry was
    /// live: the route stays, dormant; see `engine`).
    pub undo: Vec<Write>,
    /// Whether the entry bytes may change with threads running.
    pub live_safe: bool,
    /// Oldest first; the last is live. Empty: the function is original
    /// again and its route is dormant.
    pub versions: Vec<Version>,
    /// The original body, callable while patched.
    pub original: u64,
}

/// An applied patch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchRecord {
    pub id: u32,
    pub path: String,
    pub build_id: Option<String>,
    /// The target image it patches, and that image's build-id.
    pub image: String,
    #[serde(default)]
    pub image_build_id: Option<String>,
    /// Seconds since the epoch.
    pub applied_at: u64,
    /// The functions it replaces (their entries).
    pub functions: Vec<u64>,
    /// `dlopen`'s handle in the process.
    pub handle: u64,
    /// SHA-256 (hex) of the bytes loaded: exactly the file the tool read.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Who signed it (the trusted key's name), if it was signed.
    #[serde(default)]
    pub signer: Option<String>,
    /// False while an apply is going on (or if the tool died during one):
    /// some of its functions may not be flipped yet.
    pub complete: bool,
}

/// Scratch memory the tool mapped in the process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScratchRecord {
    pub base: u64,
    pub size: u64,
    /// Bytes handed out from `base`.
    pub used: u64,
    pub executable: bool,
}

/// Everything applied to one process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub next_patch_id: u32,
    pub patches: Vec<PatchRecord>,
    pub functions: Vec<FunctionRecord>,
    pub scratch: Vec<ScratchRecord>,
}

/// Byte writes into the state region: (offset, bytes), in order.
pub type RegionWrites = Vec<(usize, Vec<u8>)>;

/// A record that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("the state region does not start with the hotpatch magic")]
    BadMagic,
    #[error("state layout version {0}; this hotpatch reads version {LAYOUT_VERSION}")]
    Version(u32),
    #[error("the state region is too small ({size} bytes) for a {need}-byte record")]
    TooSmall { size: usize, need: usize },
    #[error("the state record is corrupt: {0}")]
    Corrupt(String),
    /// Decoded, but not what this tool ever writes (forged, or damaged by
    /// the process): acting on it could go wrong.
    #[error("the state record is invalid: {0}; nothing written")]
    Invalid(String),
}

/// The most bytes one recorded write holds (an entry flip writes 1 or 5
/// bytes, a route 6 to 16).
pub const MAX_WRITE: usize = 64;
/// How far from a function's entry the writes that flip it may be.
pub const ENTRY_WINDOW: u64 = 32;
/// The most bytes a detour may displace (whole instructions covering 5).
pub const MAX_DISPLACED: u64 = 32;

/// `text`, cut to a length fit for one line of an error message.
pub fn short(text: &str) -> String {
    const MAX: usize = 80;
    match text.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

impl FunctionRecord {
    /// Check what the engine relies on before it acts on this record: each
    /// write's lengths, the entry writes next to the entry, a sane detour.
    pub fn check(&self) -> Result<(), StateError> {
        let bad = |what: String| {
            StateError::Invalid(format!(
                "function `{}` at {:#x}: {what}",
                short(&self.name),
                self.entry
            ))
        };
        for w in &self.undo {
            if w.expected.len() != w.new.len() || w.new.is_empty() || w.new.len() > MAX_WRITE {
                return Err(bad(format!(
                    "a recorded write at {:#x} has {} expected and {} new bytes (1 to {MAX_WRITE}, the same)",
                    w.address,
                    w.expected.len(),
                    w.new.len()
                )));
            }
            if w.address.checked_add(w.new.len() as u64).is_none() {
                return Err(bad(format!(
                    "a recorded write at {:#x} runs past the address space",
                    w.address
                )));
            }
        }
        let need = self.route.entry_writes();
        if self.undo.len() < need {
            return Err(bad(format!(
                "{} recorded writes; its {} entry needs {need}",
                self.undo.len(),
                self.route.name()
            )));
        }
        if let Some(w) = self
            .entry_undo()
            .iter()
            .find(|w| w.address.abs_diff(self.entry) > ENTRY_WINDOW)
        {
            return Err(bad(format!(
                "its entry write at {:#x} is not at its entry",
                w.address
            )));
        }
        match self.route {
            Route::Detour { patch_at, displaced } => {
                if patch_at.abs_diff(self.entry) > ENTRY_WINDOW || !(5..=MAX_DISPLACED).contains(&displaced) {
                    return Err(bad(format!(
                        "a detour at {patch_at:#x} over {displaced} bytes does not fit its entry"
                    )));
                }
                // A multi-byte jump is never written with threads running.
                if self.live_safe {
                    return Err(bad(
                        "a detour recorded as safe to write with threads running".into()
                    ));
                }
            }
            Route::Prepared => {
                // Only single bytes change atomically for a running thread.
                if self.entry_undo().iter().any(|w| w.new.len() != 1) {
                    return Err(bad(
                        "a prepared entry recorded with writes of more than one byte".into()
                    ));
                }
            }
        }
        Ok(())
    }

    /// The writes that put the original entry back, in order.
    pub fn entry_undo(&self) -> &[Write] {
        &self.undo[..self.route.entry_writes().min(self.undo.len())]
    }

    /// The undo of the route behind the entry: what a dormant route must
    /// still hold (each write's `expected`) before it is used again.
    pub fn route_undo(&self) -> &[Write] {
        &self.undo[self.route.entry_writes().min(self.undo.len())..]
    }

    /// The entry's flip back to its original bytes.
    pub fn entry_restore(&self) -> EntryFlip {
        let writes = self.entry_undo().to_vec();
        let overwrite = match self.route {
            Route::Prepared => Overwrite {
                start: writes.iter().map(|w| w.address).min().unwrap_or(self.entry),
                len: 2,
            },
            Route::Detour { patch_at, displaced } => Overwrite {
                start: patch_at,
                len: displaced,
            },
        };
        EntryFlip {
            writes,
            overwrite,
            live_safe: self.live_safe,
        }
    }
}

impl State {
    /// Check what the engine relies on before it acts on a record read
    /// from a process (which may have written anything there).
    pub fn check(&self) -> Result<(), StateError> {
        if self.next_patch_id == u32::MAX {
            return Err(StateError::Invalid("the next patch id is at its limit".into()));
        }
        for f in &self.functions {
            f.check()?;
            // Slots are 8-aligned in a data page the tool mapped: a live
            // slot is changed by a store inside the process.
            let in_scratch = self.scratch.iter().any(|r| {
                !r.executable
                    && f.slot >= r.base
                    && f.slot
                        .checked_add(8)
                        .is_some_and(|end| end <= r.base.saturating_add(r.size))
            });
            if f.slot % 8 != 0 || !in_scratch {
                return Err(StateError::Invalid(format!(
                    "function `{}` at {:#x}: its slot at {:#x} is not in the tool's scratch memory",
                    short(&f.name),
                    f.entry,
                    f.slot
                )));
            }
        }
        for r in &self.scratch {
            if r.base.checked_add(r.size).is_none() || r.used > r.size {
                return Err(StateError::Invalid(format!(
                    "scratch at {:#x}: {} of {} bytes used",
                    r.base, r.used, r.size
                )));
            }
        }
        Ok(())
    }

    /// Each recorded function's index in `functions`, by entry: one
    /// lookup per function of a large patch instead of a scan.
    pub fn index_by_entry(&self) -> std::collections::HashMap<u64, usize> {
        self.functions
            .iter()
            .enumerate()
            .map(|(i, f)| (f.entry, i))
            .collect()
    }

    pub fn function(&self, entry: u64) -> Option<&FunctionRecord> {
        self.functions.iter().find(|f| f.entry == entry)
    }

    pub fn patch(&self, id: u32) -> Option<&PatchRecord> {
        self.patches.iter().find(|p| p.id == id)
    }
}

/// Where the active half is, and its generation (bumped by every update).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub active: u8,
    pub generation: u64,
}

/// The size of the region the engine maps (a sparse memfd: only pages
/// written use memory).
pub const REGION_SIZE: usize = 16 << 20;

fn half_size(region: usize) -> usize {
    (region - HEADER) / 2
}

fn half_offset(region: usize, half: u8) -> usize {
    HEADER + usize::from(half & 1) * half_size(region)
}

/// The header of a fresh region (half 0 active, generation 0, empty).
pub fn header() -> Vec<u8> {
    let mut h = vec![0u8; HEADER];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&LAYOUT_VERSION.to_le_bytes());
    h
}

/// A fresh region of `size` bytes holding an empty state.
pub fn init(size: usize) -> Result<Vec<u8>, StateError> {
    let mut region = vec![0u8; size];
    let (writes, _) = encode(size, None, &State::default())?;
    for (offset, bytes) in writes {
        region[offset..offset + bytes.len()].copy_from_slice(&bytes);
    }
    Ok(region)
}

/// Read the active state of a region of `size` bytes through `read`
/// (offset, length → bytes), touching only the header and the active half.
/// A region never written (its header all zeros) holds the empty state and
/// has no cursor: its first [`encode`] initialises it.
pub fn read(
    size: usize,
    mut read: impl FnMut(usize, usize) -> Result<Vec<u8>, StateError>,
) -> Result<(State, Option<Cursor>), StateError> {
    if size < HEADER + 2 * 12 {
        return Err(StateError::TooSmall {
            size,
            need: HEADER + 24,
        });
    }
    let h = read(0, HEADER)?;
    if h.len() == HEADER && h.iter().all(|&b| b == 0) {
        return Ok((State::default(), None));
    }
    if h.len() < HEADER || &h[..8] != MAGIC {
        return Err(StateError::BadMagic);
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if version != LAYOUT_VERSION {
        return Err(StateError::Version(version));
    }
    let active = h[ACTIVE_OFFSET] & 1;
    let start = half_offset(size, active);
    let head = read(start, 12)?;
    let field = |r: std::ops::Range<usize>| {
        head.get(r)
            .ok_or_else(|| StateError::Corrupt("short read".into()))
    };
    let generation = u64::from_le_bytes(
        field(0..8)?
            .try_into()
            .map_err(|_| StateError::Corrupt("generation".into()))?,
    );
    let len = u32::from_le_bytes(
        field(8..12)?
            .try_into()
            .map_err(|_| StateError::Corrupt("length".into()))?,
    ) as usize;
    if len + 12 > half_size(size) {
        return Err(StateError::Corrupt(format!("length {len} exceeds the region")));
    }
    let json = read(start + 12, len)?;
    let state = serde_json::from_slice(&json).map_err(|e| StateError::Corrupt(e.to_string()))?;
    Ok((state, Some(Cursor { active, generation })))
}

/// Decode the active state of a whole region held in memory.
pub fn decode(region: &[u8]) -> Result<(State, Option<Cursor>), StateError> {
    read(region.len(), |offset, len| {
        region
            .get(offset..offset + len)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| StateError::Corrupt("read past the region".into()))
    })
}

/// The writes (offset, bytes) that replace the state of a region of `size`
/// bytes, now at `cursor`, with `state`: first the whole inactive half,
/// then — last, one byte — the active flag. A region without a cursor
/// (never written: all zeros) gets half 0, then — last — the whole header,
/// so that until that write it still reads as never written.
pub fn encode(
    size: usize,
    cursor: Option<Cursor>,
    state: &State,
) -> Result<(RegionWrites, Cursor), StateError> {
    let json = serde_json::to_vec(state).map_err(|e| StateError::Corrupt(e.to_string()))?;
    if json.len() + 12 > half_size(size) {
        return Err(StateError::TooSmall {
            size,
            need: 2 * (json.len() + 12) + HEADER,
        });
    }
    let next = Cursor {
        // A fresh region gets half 0.
        active: cursor.map_or(0, |c| 1 - (c.active & 1)),
        generation: cursor.map_or(1, |c| c.generation.wrapping_add(1)),
    };
    let mut body = Vec::with_capacity(json.len() + 12);
    body.extend_from_slice(&next.generation.to_le_bytes());
    body.extend_from_slice(&(json.len() as u32).to_le_bytes());
    body.extend_from_slice(&json);
    let last = match cursor {
        Some(_) => (ACTIVE_OFFSET, vec![next.active]),
        None => (0, header()),
    };
    Ok((vec![(half_offset(size, next.active), body), last], next))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> State {
        State {
            next_patch_id: 2,
            patches: vec![PatchRecord {
                id: 1,
                path: "/tmp/fix.so".into(),
                build_id: Some("abcd".into()),
                image: "/srv/app".into(),
                image_build_id: None,
                applied_at: 1_700_000_000,
                functions: vec![0x5555_0000_1446],
                handle: 0x5555_2000_0000,
                sha256: Some("ab".repeat(32)),
                signer: None,
                complete: true,
            }],
            functions: vec![FunctionRecord {
                image: "/srv/app".into(),
                name: "compute_fee".into(),
                entry: 0x5555_0000_1446,
                slot: 0x5555_1000_0000,
                route: Route::Detour {
                    patch_at: 0x5555_0000_1446,
                    displaced: 6,
                },
                undo: vec![],
                live_safe: false,
                versions: vec![Version {
                    patch: 1,
                    replacement: 0x7f00_0000_1100,
                }],
                original: 0x5555_0000_1448,
            }],
            scratch: vec![],
        }
    }

    fn apply(region: &mut [u8], writes: &[(usize, Vec<u8>)]) {
        for (o, b) in writes {
            region[*o..*o + b.len()].copy_from_slice(b);
        }
    }

    #[test]
    fn round_trip_and_generations() {
        let mut region = init(4096).unwrap();
        let (state, cursor) = decode(&region).unwrap();
        let cursor = cursor.unwrap();
        assert_eq!(
            (state, cursor.generation, cursor.active),
            (State::default(), 1, 0)
        );
        let (w, next) = encode(region.len(), Some(cursor), &sample()).unwrap();
        assert_eq!((next.generation, next.active), (2, 1));
        apply(&mut region, &w);
        assert_eq!(decode(&region).unwrap(), (sample(), Some(next)));
    }

    #[test]
    fn records_without_a_route_are_prepared() {
        let mut json = serde_json::to_value(&sample().functions[0]).unwrap();
        json.as_object_mut().unwrap().remove("route");
        let f: FunctionRecord = serde_json::from_value(json).unwrap();
        assert_eq!(f.route, Route::Prepared);
    }

    #[test]
    fn entry_restore_covers_what_the_route_overwrote() {
        let w = |address: u64, len: usize| Write {
            address,
            expected: vec![1; len],
            new: vec![2; len],
        };
        let mut f = sample().functions[0].clone();
        f.undo = vec![w(0x5555_0000_1446, 5), w(0x7000, 16), w(0x7010, 8)];
        let restore = f.entry_restore();
        assert_eq!(restore.writes, vec![w(0x5555_0000_1446, 5)]);
        assert_eq!(f.route_undo().len(), 2);
        assert_eq!(
            (restore.overwrite.start, restore.overwrite.len, restore.live_safe),
            (0x5555_0000_1446, 6, false)
        );
        f.route = Route::Prepared;
        f.undo = vec![w(0x1447, 1), w(0x1446, 1), w(0x1440, 6)];
        let restore = f.entry_restore();
        assert_eq!(restore.writes.len(), 2);
        assert_eq!((restore.overwrite.start, restore.overwrite.len), (0x1446, 2));
        assert_eq!(f.route_undo(), &[w(0x1440, 6)]);
    }

    /// A tool killed after any prefix of an update's writes leaves either
    /// the old or the new state, never a broken one.
    #[test]
    fn interrupted_update_keeps_the_old_state() {
        let mut region = init(4096).unwrap();
        let (_, cursor) = decode(&region).unwrap();
        let (w, cursor) = encode(region.len(), cursor, &sample()).unwrap();
        apply(&mut region, &w);
        let mut next = sample();
        next.next_patch_id = 3;
        let (w, _) = encode(region.len(), Some(cursor), &next).unwrap();
        let (offset, body) = &w[0];
        for cut in [0, 1, body.len() / 2, body.len()] {
            let mut r = region.clone();
            r[*offset..*offset + cut].copy_from_slice(&body[..cut]);
            assert_eq!(decode(&r).unwrap().0, sample(), "cut at {cut}");
        }
        apply(&mut region, &w);
        assert_eq!(decode(&region).unwrap().0, next);
    }

    /// A tool killed right after mapping the region leaves it all zeros:
    /// that reads as empty, and the next update initialises it — header
    /// last, so a kill before that still reads as never written.
    #[test]
    fn a_region_never_written_reads_as_empty() {
        let mut region = vec![0u8; 4096];
        assert_eq!(decode(&region).unwrap(), (State::default(), None));
        let (w, cursor) = encode(region.len(), None, &sample()).unwrap();
        assert_eq!(w.last().map(|(o, b)| (*o, b.clone())), Some((0, header())));
        let mut partly = region.clone();
        apply(&mut partly, &w[..w.len() - 1]);
        assert_eq!(decode(&partly).unwrap(), (State::default(), None));
        apply(&mut region, &w);
        assert_eq!(decode(&region).unwrap(), (sample(), Some(cursor)));
        // Not all zeros and no magic: someone else's bytes.
        let mut foreign = vec![0u8; 4096];
        foreign[13] = 1;
        assert_eq!(decode(&foreign), Err(StateError::BadMagic));
    }

    /// Records the tool never writes are refused before anything acts on
    /// them, each naming the function.
    #[test]
    fn check_refuses_what_the_tool_never_records() {
        let w = |address: u64, expected: &[u8], new: &[u8]| Write {
            address,
            expected: expected.to_vec(),
            new: new.to_vec(),
        };
        let mut state = sample();
        state.scratch = vec![ScratchRecord {
            base: 0x5555_1000_0000,
            size: 0x1000,
            used: 8,
            executable: false,
        }];
        state.functions[0].undo = vec![w(0x5555_0000_1446, &[0xe9, 0, 0, 0, 0], &[1, 2, 3, 4, 5])];
        assert_eq!(state.check(), Ok(()));
        let refused = |change: &dyn Fn(&mut State), what: &str| {
            let mut s = state.clone();
            change(&mut s);
            match s.check() {
                Err(StateError::Invalid(m)) => {
                    assert!(m.contains("`compute_fee`") && m.contains(what), "{m}")
                }
                other => panic!("{what}: {other:?}"),
            }
        };
        refused(&|s| s.functions[0].undo[0].new.push(6), "5 expected and 6 new");
        refused(&|s| s.functions[0].undo.clear(), "needs 1");
        refused(&|s| s.functions[0].undo[0].address = 0x1000, "not at its entry");
        refused(&|s| s.functions[0].live_safe = true, "threads running");
        refused(&|s| s.functions[0].slot += 0x2000, "not in the tool's scratch");
        refused(&|s| s.functions[0].slot += 4, "not in the tool's scratch");
        refused(
            &|s| {
                s.functions[0].route = Route::Prepared;
                s.functions[0].undo.push(w(0x5555_0000_1447, &[1], &[2]));
            },
            "more than one byte",
        );
        state.next_patch_id = u32::MAX;
        assert!(matches!(state.check(), Err(StateError::Invalid(_))));
    }

    #[test]
    fn refuses_foreign_or_small_regions() {
        let mut foreign = [0u8; 64];
        foreign[..8].copy_from_slice(b"NOTHOTPA");
        assert_eq!(decode(&foreign), Err(StateError::BadMagic));
        assert!(matches!(decode(&[0u8; 4]), Err(StateError::TooSmall { .. })));
        let mut region = init(4096).unwrap();
        region[8] = 9;
        assert_eq!(decode(&region), Err(StateError::Version(9)));
        assert!(matches!(
            encode(200, None, &sample()),
            Err(StateError::TooSmall { .. })
        ));
    }
}
