//! Prepared entries (`-fpatchable-function-entry`) and how to flip them.
//!
//! A flip writes, in order: the 8-byte slot (not executed by anyone), a
//! long jump into the padding (never executed before the flip), and last
//! the 2-byte short jump over the entry nops, one byte at a time. Only that
//! last step races with running threads, and [`prove_live_flip`] decides by
//! decoding every intermediate byte state whether a thread can ever execute
//! something harmful during it. Where it cannot prove that, the plan says
//! the threads must be stopped for the write.

use super::jump::{self, NEAR_JUMP_LEN, SLOT_JUMP_LEN};
use super::{decode_one, format_instruction};
use iced_x86::Mnemonic;

/// `endbr64`, which CET builds put first in every function.
pub const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
/// The one-byte nop of the padding.
pub const NOP: u8 = 0x90;
/// Bytes the compiler may put between the padding and the entry.
const INT3: u8 = 0xcc;
/// How far after its site we look for a function's entry.
pub const MAX_PADDING: u64 = 64;

/// The instruction(s) at the entry that the short jump replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntryNops {
    /// `66 90`: one 2-byte nop (clang, rustc, `hotpatch prepare`).
    Nop2,
    /// `90 90`: two 1-byte nops (gcc). A thread may sit between them.
    TwoNop1,
}

impl EntryNops {
    pub fn bytes(self) -> [u8; 2] {
        match self {
            EntryNops::Nop2 => [0x66, 0x90],
            EntryNops::TwoNop1 => [0x90, 0x90],
        }
    }
}

/// A recognised prepared function entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PreparedEntry {
    /// The first padding byte, as listed in `__patchable_function_entries`.
    pub site: u64,
    /// Number of `nop`s starting at `site`: room for the long jump.
    pub padding: u64,
    /// The function's entry (its symbol's address).
    pub entry: u64,
    pub endbr64: bool,
    pub nops: EntryNops,
    /// Where the entry nops (and later the short jump) are.
    pub nops_at: u64,
}

impl PreparedEntry {
    /// The `-fpatchable-function-entry=N,M` that produced this layout, with
    /// the entry bytes: e.g. `8,6 endbr64 90 90`.
    pub fn layout(&self) -> String {
        let mut s = format!("{},{}", self.padding + 2, self.padding);
        if self.entry - self.site != self.padding {
            s.push_str(&format!(" +{} int3", self.entry - self.site - self.padding));
        }
        if self.endbr64 {
            s.push_str(" endbr64");
        }
        s.push_str(match self.nops {
            EntryNops::Nop2 => " 66 90",
            EntryNops::TwoNop1 => " 90 90",
        });
        s
    }
}

/// Why bytes at a listed site are not a prepared entry we can flip.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotPrepared {
    #[error("byte {found:#04x} at {at:#x} between the padding and the entry is not a nop or int3")]
    Padding { at: u64, found: u8 },
    #[error("entry at {at:#x} starts with {found}, not 2 bytes of nops (already patched?)")]
    EntryNops { at: u64, found: String },
    #[error("the bytes at {at:#x} are not in the file")]
    Missing { at: u64 },
}

/// Recognise the prepared layout of the function at `entry`, whose padding
/// starts at `site`. `bytes` are the code bytes from `site` on (at least up
/// to the entry nops).
pub fn recognize_prepared(site: u64, entry: u64, bytes: &[u8]) -> Result<PreparedEntry, NotPrepared> {
    let offset = |a: u64| usize::try_from(a - site).unwrap_or(usize::MAX);
    let byte = |a: u64| {
        bytes
            .get(offset(a))
            .copied()
            .ok_or(NotPrepared::Missing { at: a })
    };
    let mut padding = 0;
    while site + padding < entry && byte(site + padding)? == NOP {
        padding += 1;
    }
    for a in site + padding..entry {
        let b = byte(a)?;
        if b != INT3 && b != NOP {
            return Err(NotPrepared::Padding { at: a, found: b });
        }
    }
    let at_entry = bytes.get(offset(entry)..).unwrap_or(&[]);
    let endbr64 = at_entry.starts_with(&ENDBR64);
    let nops_at = entry + if endbr64 { 4 } else { 0 };
    let pair = [byte(nops_at)?, byte(nops_at + 1)?];
    let nops = match pair {
        [0x66, 0x90] => EntryNops::Nop2,
        [0x90, 0x90] => EntryNops::TwoNop1,
        _ => {
            return Err(NotPrepared::EntryNops {
                at: nops_at,
                found: format!("{:02x} {:02x}", pair[0], pair[1]),
            });
        }
    };
    Ok(PreparedEntry {
        site,
        padding,
        entry,
        endbr64,
        nops,
        nops_at,
    })
}

/// Find the entry of a listed site that no symbol names: after the run of
/// nops, at an `endbr64` or `66 90`, else two bytes before the run ends
/// (gcc's `90 90`).
pub fn guess_entry(site: u64, bytes: &[u8]) -> Option<u64> {
    let run = bytes.iter().take_while(|&&b| b == NOP).count();
    let rest = &bytes[run..];
    if rest.starts_with(&ENDBR64) || rest.starts_with(&[0x66, 0x90]) {
        Some(site + run as u64)
    } else if run >= 2 {
        Some(site + run as u64 - 2)
    } else {
        None
    }
}

/// The instruction written into the padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LongJump {
    /// `ff 25 disp32`: `jmp [rip+disp32]` straight through the slot.
    Slot,
    /// `e9 rel32` to a trampoline (`jmp [slot]`) in an executable page
    /// near the image: 5 bytes, for when a 6-byte jump's position would
    /// make the short jump's offset byte unsafe.
    Trampoline,
}

impl LongJump {
    /// Its length in bytes.
    pub fn size(self) -> u64 {
        match self {
            LongJump::Slot => SLOT_JUMP_LEN as u64,
            LongJump::Trampoline => NEAR_JUMP_LEN as u64,
        }
    }
}

/// Why a live flip (no threads stopped) is not proven safe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[serde(tag = "hazard", rename_all = "kebab-case")]
pub enum FlipHazard {
    #[error("the entry bytes at {at:#x} straddle a cache line")]
    StraddlesCacheLine { at: u64 },
    #[error("with entry bytes {state} a thread at {at:#x} would run `{instruction}`")]
    Instruction {
        state: String,
        at: u64,
        instruction: String,
    },
}

/// How a prepared function is flipped.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FlipPlan {
    pub long_jump: LongJump,
    pub long_jump_at: u64,
    pub short_jump_at: u64,
    pub original: [u8; 2],
    pub short_jump: [u8; 2],
    /// Which of the two entry bytes is written first (the other second);
    /// revert writes them in the opposite order.
    pub first_byte: usize,
    /// `None` when the byte-by-byte flip is proven safe with threads running;
    /// otherwise why the threads must be stopped for the write.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hazard: Option<FlipHazard>,
}

impl FlipPlan {
    pub fn live_safe(&self) -> bool {
        self.hazard.is_none()
    }
}

/// The padding is too small for any long jump.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{padding} bytes of padding at {site:#x} hold no long jump (5 needed)")]
pub struct NoRoom {
    pub site: u64,
    pub padding: u64,
}

/// Choose where the long jump goes and in which order the entry bytes are
/// written. Preference: a proven-safe live flip through the slot, then one
/// through a trampoline, then (threads stopped) the slot jump nearest the
/// entry. `following` are the code bytes right after the entry nops.
pub fn plan_flip(entry: &PreparedEntry, following: &[u8]) -> Result<FlipPlan, NoRoom> {
    let original = entry.nops.bytes();
    let mut fallback: Option<FlipPlan> = None;
    for long_jump in [LongJump::Slot, LongJump::Trampoline] {
        let len = long_jump.size();
        if entry.padding < len {
            continue;
        }
        // Nearest the entry first: the short jump's offset stays small.
        for long_jump_at in (entry.site..=entry.site + entry.padding - len).rev() {
            let Ok(short_jump) = jump::short_jump(entry.nops_at, long_jump_at) else {
                continue;
            };
            let mut hazard = None;
            for first_byte in [1, 0] {
                let plan = FlipPlan {
                    long_jump,
                    long_jump_at,
                    short_jump_at: entry.nops_at,
                    original,
                    short_jump,
                    first_byte,
                    hazard: None,
                };
                match prove_live_flip(entry.nops_at, original, short_jump, first_byte, following) {
                    Ok(()) => return Ok(plan),
                    Err(h) => hazard = hazard.or(Some(h)),
                }
            }
            if fallback.is_none() {
                fallback = Some(FlipPlan {
                    long_jump,
                    long_jump_at,
                    short_jump_at: entry.nops_at,
                    original,
                    short_jump,
                    first_byte: 1,
                    hazard,
                });
            }
        }
    }
    fallback.ok_or(NoRoom {
        site: entry.site,
        padding: entry.padding,
    })
}

/// The byte states the entry passes through when `old` becomes `new` one
/// byte at a time, `first` byte first: old, intermediate, new. Revert
/// passes through the same states backwards.
pub fn flip_states(old: [u8; 2], new: [u8; 2], first: usize) -> [[u8; 2]; 3] {
    let mut mid = old;
    mid[first] = new[first];
    [old, mid, new]
}

/// Prove that writing `new` over `old` at `at`, one byte at a time with
/// byte `first` first, is safe for threads running through those bytes.
///
/// A thread can be at any instruction boundary of the old code, and — after
/// running an instruction of some intermediate state — wherever that
/// instruction ends. At every such position, in every state, the decoded
/// instruction must be one of: the old instruction itself (same bytes), the
/// finished short jump, or a flags-only instruction (`nop`, `clc`, `cmc`,
/// `stc`) that ends inside the two bytes or right after them, where the
/// old body continues unchanged. `following` are the bytes after the two.
pub fn prove_live_flip(
    at: u64,
    old: [u8; 2],
    new: [u8; 2],
    first: usize,
    following: &[u8],
) -> Result<(), FlipHazard> {
    if at % 64 == 63 {
        return Err(FlipHazard::StraddlesCacheLine { at });
    }
    let end = at + 2;
    let states = flip_states(old, new, first);
    let code = |state: [u8; 2]| {
        let mut v = state.to_vec();
        v.extend_from_slice(&following[..following.len().min(15)]);
        v
    };
    // Old instruction boundaries inside the two bytes.
    let mut old_boundaries = vec![at];
    let mut p = at;
    while p < end {
        let len = decode_one(&code(old)[(p - at) as usize..], p).len().max(1) as u64;
        p += len;
        if p < end {
            old_boundaries.push(p);
        }
    }
    let mut positions = old_boundaries.clone();
    let mut i = 0;
    while i < positions.len() {
        let pos = positions[i];
        i += 1;
        for state in states {
            let bytes = code(state);
            let off = (pos - at) as usize;
            let insn = decode_one(&bytes[off..], pos);
            let len = insn.len() as u64;
            let next = pos + len;
            let region = off..(off + len as usize).min(2);
            let is_old = old_boundaries.contains(&pos)
                && !insn.is_invalid()
                && decode_one(&code(old)[off..], pos).len() == insn.len()
                && state[region.clone()] == old[region];
            let is_new = pos == at && state == new;
            let benign = !insn.is_invalid()
                && next <= end
                && !insn.has_lock_prefix()
                && matches!(
                    insn.mnemonic(),
                    Mnemonic::Nop | Mnemonic::Clc | Mnemonic::Cmc | Mnemonic::Stc
                );
            if is_old || is_new {
                continue;
            }
            if !benign {
                return Err(FlipHazard::Instruction {
                    state: format!("{:02x} {:02x}", state[0], state[1]),
                    at: pos,
                    instruction: if insn.is_invalid() {
                        "(invalid)".to_string()
                    } else {
                        format_instruction(&insn)
                    },
                });
            }
            if next < end && !positions.contains(&next) {
                positions.push(next);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BODY: [u8; 4] = [0x53, 0x89, 0xf3, 0xc3]; // push rbx; mov ebx,esi; ret

    /// Build the bytes from the site for a layout: padding, optional
    /// endbr64, entry nops, body.
    fn layout(padding: usize, endbr: bool, nops: [u8; 2]) -> Vec<u8> {
        let mut v = vec![NOP; padding];
        if endbr {
            v.extend_from_slice(&ENDBR64);
        }
        v.extend_from_slice(&nops);
        v.extend_from_slice(&BODY);
        v
    }

    fn plan_for(padding: usize, endbr: bool, nops: [u8; 2]) -> (PreparedEntry, FlipPlan) {
        let site = 0x1_0000;
        let bytes = layout(padding, endbr, nops);
        let entry = recognize_prepared(site, site + padding as u64, &bytes).unwrap();
        let plan = plan_flip(&entry, &BODY).unwrap();
        (entry, plan)
    }

    #[test]
    fn recognises_every_layout() {
        for (padding, endbr, nops, kind, name) in [
            (6, false, [0x66, 0x90], EntryNops::Nop2, "8,6 66 90"),
            (6, false, [0x90, 0x90], EntryNops::TwoNop1, "8,6 90 90"),
            (6, true, [0x66, 0x90], EntryNops::Nop2, "8,6 endbr64 66 90"),
            (6, true, [0x90, 0x90], EntryNops::TwoNop1, "8,6 endbr64 90 90"),
            (14, false, [0x66, 0x90], EntryNops::Nop2, "16,14 66 90"),
            (14, true, [0x90, 0x90], EntryNops::TwoNop1, "16,14 endbr64 90 90"),
        ] {
            let (entry, _) = plan_for(padding, endbr, nops);
            assert_eq!(entry.nops, kind);
            assert_eq!(entry.endbr64, endbr);
            assert_eq!(entry.layout(), name);
        }
    }

    /// Every standard layout has a proven-safe live flip, and the states it
    /// passes through are exactly what the plan says.
    #[test]
    fn standard_layouts_flip_live() {
        for padding in [6, 14] {
            for endbr in [false, true] {
                for nops in [[0x66, 0x90], [0x90, 0x90]] {
                    let (entry, plan) = plan_for(padding, endbr, nops);
                    assert!(plan.live_safe(), "{}: {:?}", entry.layout(), plan.hazard);
                    // The short jump lands on the long jump, inside the padding.
                    let rel = plan.short_jump[1] as i8 as i64;
                    assert_eq!(plan.short_jump[0], 0xeb);
                    assert_eq!((entry.nops_at as i64 + 2 + rel) as u64, plan.long_jump_at);
                    assert!(plan.long_jump_at >= entry.site);
                    assert!(plan.long_jump_at + plan.long_jump.size() <= entry.site + entry.padding);
                }
            }
        }
    }

    #[test]
    fn known_choices() {
        // No endbr: jmp [slot] right before the entry, `eb f8`.
        let (_, plan) = plan_for(6, false, [0x90, 0x90]);
        assert_eq!(
            (plan.long_jump, plan.short_jump, plan.first_byte),
            (LongJump::Slot, [0xeb, 0xf8], 1)
        );
        // endbr64 with 6 bytes of padding: the slot jump would give `eb f4`
        // (hlt as the intermediate byte); the 5-byte trampoline jump gives
        // `eb f5` (cmc).
        let (_, plan) = plan_for(6, true, [0x66, 0x90]);
        assert_eq!(
            (plan.long_jump, plan.short_jump),
            (LongJump::Trampoline, [0xeb, 0xf5])
        );
    }

    /// The intermediate states named in DESIGN.md, decoded.
    #[test]
    fn intermediate_states_decode_as_documented() {
        let text = |b: &[u8]| format_instruction(&decode_one(b, 0));
        let m = |b: &[u8]| decode_one(b, 0).mnemonic();
        assert_eq!(m(&[0x66, 0xf8]), Mnemonic::Clc);
        assert_eq!(decode_one(&[0x66, 0xf8], 0).len(), 2);
        assert_eq!(m(&[0x90, 0xf8]), Mnemonic::Nop);
        assert_eq!(m(&[0xf8]), Mnemonic::Clc);
        assert_eq!(m(&[0x66, 0xf5]), Mnemonic::Cmc);
        assert_eq!(m(&[0xf4]), Mnemonic::Hlt);
        assert_eq!(m(&[0x66, 0xf4]), Mnemonic::Hlt);
        assert_eq!(text(&[0xeb, 0x90]), "jmp short 0FFFFFFFFFFFFFF92h");
    }

    #[test]
    fn unsafe_orders_are_rejected() {
        // Writing the opcode first exposes `eb 90`: jump -112.
        let h = prove_live_flip(0x1000, [0x66, 0x90], [0xeb, 0xf8], 0, &BODY).unwrap_err();
        assert!(matches!(h, FlipHazard::Instruction { at: 0x1000, .. }), "{h}");
        // rel8 = f4 is hlt for a thread between gcc's nops, and `66 f4` too.
        assert!(prove_live_flip(0x1000, [0x90, 0x90], [0xeb, 0xf4], 1, &BODY).is_err());
        assert!(prove_live_flip(0x1000, [0x66, 0x90], [0xeb, 0xf4], 1, &BODY).is_err());
        // f0 (lock) and f3 (rep, applied to the body's first instruction).
        assert!(prove_live_flip(0x1000, [0x90, 0x90], [0xeb, 0xf0], 1, &BODY).is_err());
        assert!(prove_live_flip(0x1000, [0x90, 0x90], [0xeb, 0xf3], 1, &BODY).is_err());
        // Straddling a cache line: never proven.
        assert_eq!(
            prove_live_flip(0x103f, [0x66, 0x90], [0xeb, 0xf8], 1, &BODY),
            Err(FlipHazard::StraddlesCacheLine { at: 0x103f })
        );
    }

    #[test]
    fn no_room_without_padding() {
        let bytes = layout(4, false, [0x66, 0x90]);
        let entry = recognize_prepared(0x1000, 0x1004, &bytes).unwrap();
        assert!(plan_flip(&entry, &BODY).is_err());
    }

    #[test]
    fn refuses_patched_or_odd_entries() {
        let mut bytes = layout(6, false, [0xeb, 0xf8]);
        assert!(matches!(
            recognize_prepared(0x1000, 0x1006, &bytes),
            Err(NotPrepared::EntryNops { at: 0x1006, .. })
        ));
        bytes = layout(6, false, [0x66, 0x90]);
        bytes[3] = 0x55;
        // A non-nop inside what should be padding ends the padding early and
        // is reported.
        assert!(matches!(
            recognize_prepared(0x1000, 0x1006, &bytes),
            Err(NotPrepared::Padding {
                at: 0x1003,
                found: 0x55
            })
        ));
        bytes = layout(6, false, [0x66, 0x90]);
        assert!(matches!(
            recognize_prepared(0x1000, 0x1006, &bytes[..7]),
            Err(NotPrepared::Missing { .. })
        ));
    }

    #[test]
    fn guesses_unnamed_entries() {
        assert_eq!(guess_entry(0x100, &layout(6, false, [0x66, 0x90])), Some(0x106));
        assert_eq!(guess_entry(0x100, &layout(6, true, [0x90, 0x90])), Some(0x106));
        assert_eq!(guess_entry(0x100, &layout(6, false, [0x90, 0x90])), Some(0x106));
        assert_eq!(guess_entry(0x100, &layout(14, false, [0x90, 0x90])), Some(0x10e));
    }

    /// A second model of a racing thread, as a random walk rather than a
    /// closure: the thread starts at an old instruction boundary, the
    /// writes land between any two of its instructions (the state only moves
    /// forward), and it may only run old instructions, the finished jump, or
    /// flag-only instructions that stay within the two bytes.
    fn simulate(at: u64, old: [u8; 2], new: [u8; 2], first: usize, picks: &[usize]) -> bool {
        let states = flip_states(old, new, first);
        let between_nops = old[0] == NOP && picks[0] % 2 == 1;
        let mut pos = if between_nops { at + 1 } else { at };
        let mut old_boundary = true;
        let mut state_index = 0;
        for &pick in &picks[1..] {
            if pos >= at + 2 {
                return true;
            }
            state_index = (state_index + pick % 2).min(2);
            let state = states[state_index];
            if pos == at && state == new {
                return true;
            }
            let off = (pos - at) as usize;
            let mut bytes = state[off..].to_vec();
            bytes.extend_from_slice(&BODY);
            let insn = decode_one(&bytes, pos);
            let len = insn.len();
            let mut old_bytes = old[off..].to_vec();
            old_bytes.extend_from_slice(&BODY);
            let runs_old = old_boundary && bytes[..len] == old_bytes[..len];
            let flag_only = off + len <= 2
                && matches!(
                    insn.mnemonic(),
                    Mnemonic::Nop | Mnemonic::Clc | Mnemonic::Cmc | Mnemonic::Stc
                );
            if !runs_old && !flag_only {
                return false;
            }
            old_boundary = runs_old;
            pos += len as u64;
        }
        true
    }

    proptest! {
        /// Whatever the planner calls live-safe, the simulation never sees
        /// a bad instruction, for every rel8 and both write orders.
        #[test]
        fn proven_flips_survive_simulation(
            rel in any::<u8>(),
            gcc in any::<bool>(),
            first in 0usize..2,
            picks in proptest::collection::vec(0usize..4, 2..12),
        ) {
            let old = if gcc { [0x90, 0x90] } else { [0x66, 0x90] };
            let new = [0xeb, rel];
            if prove_live_flip(0x2000, old, new, first, &BODY).is_ok() {
                prop_assert!(simulate(0x2000, old, new, first, &picks));
            }
        }

        /// The classifier never panics, whatever the bytes.
        #[test]
        fn recognize_and_plan_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..40), pad in 0u64..20) {
            if let Ok(entry) = recognize_prepared(0x5000, 0x5000 + pad, &bytes) {
                let _ = plan_flip(&entry, &bytes);
            }
            let _ = guess_entry(0x5000, &bytes);
        }
    }
}
