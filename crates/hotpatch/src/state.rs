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
//! intact. This module only encodes and decodes; the engine does the I/O.

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
    /// Where the short jump is written (the entry nops) in the process.
    pub entry: u64,
    pub slot: u64,
    /// Writes that undo the flip, in order: entry bytes, padding, trampoline.
    pub undo: Vec<crate::plan::Write>,
    /// Oldest first; the last is live.
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
    /// The target image it patches.
    pub image: String,
    /// Seconds since the epoch.
    pub applied_at: u64,
    /// The functions it replaces (their entries).
    pub functions: Vec<u64>,
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
}

impl State {
    pub fn function(&self, entry: u64) -> Option<&FunctionRecord> {
        self.functions.iter().find(|f| f.entry == entry)
    }

    pub fn patch(&self, id: u32) -> Option<&PatchRecord> {
        self.patches.iter().find(|p| p.id == id)
    }
}

fn half_size(region: usize) -> usize {
    (region - HEADER) / 2
}

/// A fresh region of `size` bytes holding an empty state (half 0 active).
pub fn init(size: usize) -> Result<Vec<u8>, StateError> {
    let mut region = vec![0u8; size];
    region[..8].copy_from_slice(MAGIC);
    region[8..12].copy_from_slice(&LAYOUT_VERSION.to_le_bytes());
    let (writes, _) = encode(&region, &State::default())?;
    for (offset, bytes) in writes {
        region[offset..offset + bytes.len()].copy_from_slice(&bytes);
    }
    Ok(region)
}

/// Decode the active state of a region.
pub fn decode(region: &[u8]) -> Result<(State, u64), StateError> {
    if region.len() < HEADER + 2 * 12 {
        return Err(StateError::TooSmall {
            size: region.len(),
            need: HEADER + 24,
        });
    }
    if &region[..8] != MAGIC {
        return Err(StateError::BadMagic);
    }
    let version = u32::from_le_bytes([region[8], region[9], region[10], region[11]]);
    if version != LAYOUT_VERSION {
        return Err(StateError::Version(version));
    }
    let active = usize::from(region[ACTIVE_OFFSET] & 1);
    let start = HEADER + active * half_size(region.len());
    let half = &region[start..start + half_size(region.len())];
    let generation = u64::from_le_bytes(
        half[..8]
            .try_into()
            .map_err(|_| StateError::Corrupt("header".into()))?,
    );
    let len = u32::from_le_bytes(
        half[8..12]
            .try_into()
            .map_err(|_| StateError::Corrupt("length".into()))?,
    ) as usize;
    let json = half
        .get(12..12 + len)
        .ok_or_else(|| StateError::Corrupt(format!("length {len} exceeds the region")))?;
    let state = serde_json::from_slice(json).map_err(|e| StateError::Corrupt(e.to_string()))?;
    Ok((state, generation))
}

/// The writes (offset, bytes) that replace the region's state with `state`:
/// first the whole inactive half, then — last, one byte — the active flag.
/// Also returns the new generation.
pub fn encode(region: &[u8], state: &State) -> Result<(RegionWrites, u64), StateError> {
    let half = half_size(region.len());
    let json = serde_json::to_vec(state).map_err(|e| StateError::Corrupt(e.to_string()))?;
    if json.len() + 12 > half {
        return Err(StateError::TooSmall {
            size: region.len(),
            need: 2 * (json.len() + 12) + HEADER,
        });
    }
    let (active, generation) = match decode(region) {
        Ok((_, g)) => (usize::from(region[ACTIVE_OFFSET] & 1), g),
        // A fresh region: pretend half 1 is active so half 0 gets written.
        Err(_) => (1, 0),
    };
    let target = 1 - active;
    let mut body = Vec::with_capacity(json.len() + 12);
    body.extend_from_slice(&(generation + 1).to_le_bytes());
    body.extend_from_slice(&(json.len() as u32).to_le_bytes());
    body.extend_from_slice(&json);
    Ok((
        vec![
            (HEADER + target * half, body),
            (ACTIVE_OFFSET, vec![target as u8]),
        ],
        generation + 1,
    ))
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
                applied_at: 1_700_000_000,
                functions: vec![0x5555_0000_1446],
            }],
            functions: vec![FunctionRecord {
                image: "/srv/app".into(),
                name: "compute_fee".into(),
                entry: 0x5555_0000_1446,
                slot: 0x5555_1000_0000,
                undo: vec![],
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
        assert_eq!(decode(&region).unwrap(), (State::default(), 1));
        let (w, g) = encode(&region, &sample()).unwrap();
        assert_eq!(g, 2);
        apply(&mut region, &w);
        assert_eq!(decode(&region).unwrap(), (sample(), 2));
    }

    /// A tool killed after any prefix of an update's writes leaves either
    /// the old or the new state, never a broken one.
    #[test]
    fn interrupted_update_keeps_the_old_state() {
        let mut region = init(4096).unwrap();
        let (w, _) = encode(&region, &sample()).unwrap();
        apply(&mut region, &w);
        let mut next = sample();
        next.next_patch_id = 3;
        let (w, _) = encode(&region, &next).unwrap();
        let (offset, body) = &w[0];
        for cut in [0, 1, body.len() / 2, body.len()] {
            let mut r = region.clone();
            r[*offset..*offset + cut].copy_from_slice(&body[..cut]);
            assert_eq!(decode(&r).unwrap().0, sample(), "cut at {cut}");
        }
        apply(&mut region, &w);
        assert_eq!(decode(&region).unwrap().0, next);
    }

    #[test]
    fn refuses_foreign_or_small_regions() {
        assert_eq!(decode(&[0u8; 64]), Err(StateError::BadMagic));
        assert!(matches!(decode(&[0u8; 4]), Err(StateError::TooSmall { .. })));
        let mut region = init(4096).unwrap();
        region[8] = 9;
        assert_eq!(decode(&region), Err(StateError::Version(9)));
        let region = init(200).unwrap();
        assert!(matches!(
            encode(&region, &sample()),
            Err(StateError::TooSmall { .. })
        ));
    }
}
