//! Unprepared functions: can a 5-byte `jmp rel32` be put at the entry,
//! with the whole instructions it covers relocated into a trampoline?
//!
//! This module looks at one function's bytes. Facts that need the whole
//! image — a branch from elsewhere into the covered bytes, another symbol
//! starting inside them — are checked by the caller with
//! [`Detour::overwrites`] and [`direct_branch_targets`].

use super::entry::ENDBR64;
use super::format_instruction;
use super::jump::NEAR_JUMP_LEN;
use iced_x86::{Decoder, DecoderOptions, FlowControl, Mnemonic, OpKind};

/// A feasible detour.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Detour {
    /// Where the `jmp rel32` goes: the entry, or right after `endbr64`
    /// (which stays, so indirect calls still land on it).
    pub patch_at: u64,
    /// Bytes covered by the jump, rounded up to whole instructions.
    pub displaced: u64,
    /// Number of whole instructions moved to the trampoline.
    pub instructions: usize,
    /// Of those, how many address memory relative to `rip`.
    pub rip_relative: usize,
    /// Of those, how many are relative branches or calls.
    pub branches: usize,
}

impl Detour {
    /// Whether `address` is strictly inside the overwritten bytes: a branch
    /// to it, or a function starting at it, would land mid-jump.
    pub fn overwrites(&self, address: u64) -> bool {
        address > self.patch_at && address < self.patch_at + self.displaced
    }
}

/// Why a function cannot be detoured, as far as its own bytes tell.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DetourRefusal {
    #[error("the symbol has no size")]
    UnknownSize,
    #[error("{size} bytes, too small for a {NEAR_JUMP_LEN}-byte jump (needs {needed})")]
    TooSmall { size: u64, needed: u64 },
    #[error("undecodable instruction at {at:#x}")]
    Undecodable { at: u64 },
    #[error("`{instruction}` at {at:#x} cannot be relocated")]
    Unrelocatable { at: u64, instruction: String },
    #[error("a breakpoint (int3) at {at:#x}: is a debugger attached?")]
    Breakpoint { at: u64 },
}

/// Whether an instruction can be moved elsewhere and still do the same.
pub(crate) fn unrelocatable(mnemonic: Mnemonic) -> bool {
    matches!(
        mnemonic,
        // rel8-only branches with no wide form.
        Mnemonic::Loop
            | Mnemonic::Loope
            | Mnemonic::Loopne
            | Mnemonic::Jrcxz
            | Mnemonic::Jecxz
            | Mnemonic::Jcxz
            // Transaction abort target is relative and checked by hardware.
            | Mnemonic::Xbegin
    )
}

/// Analyse the function at `entry` whose bytes (exactly its symbol's size)
/// are `code`.
pub fn analyze_detour(entry: u64, code: &[u8]) -> Result<Detour, DetourRefusal> {
    if code.is_empty() {
        return Err(DetourRefusal::UnknownSize);
    }
    let skip = if code.starts_with(&ENDBR64) {
        ENDBR64.len()
    } else {
        0
    };
    let needed = (skip + NEAR_JUMP_LEN) as u64;
    let size = code.len() as u64;
    if size < needed {
        return Err(DetourRefusal::TooSmall { size, needed });
    }
    let patch_at = entry + skip as u64;
    let mut decoder = Decoder::with_ip(64, &code[skip..], patch_at, DecoderOptions::NONE);
    let mut detour = Detour {
        patch_at,
        displaced: 0,
        instructions: 0,
        rip_relative: 0,
        branches: 0,
    };
    while detour.displaced < NEAR_JUMP_LEN as u64 {
        if !decoder.can_decode() {
            // The last instruction runs past the symbol's end.
            return Err(DetourRefusal::TooSmall {
                size,
                needed: skip as u64 + detour.displaced + 1,
            });
        }
        let insn = decoder.decode();
        if insn.is_invalid() {
            // Decoding ran out of bytes (the instruction is cut by the
            // symbol's end) or met garbage.
            if insn.next_ip() > entry + size || decoder.last_error() == iced_x86::DecoderError::NoMoreBytes {
                return Err(DetourRefusal::TooSmall {
                    size,
                    needed: skip as u64 + detour.displaced + insn.len().max(1) as u64,
                });
            }
            return Err(DetourRefusal::Undecodable { at: insn.ip() });
        }
        if insn.mnemonic() == Mnemonic::Int3 {
            return Err(DetourRefusal::Breakpoint { at: insn.ip() });
        }
        if unrelocatable(insn.mnemonic()) {
            return Err(DetourRefusal::Unrelocatable {
                at: insn.ip(),
                instruction: format_instruction(&insn),
            });
        }
        if insn.is_ip_rel_memory_operand() {
            detour.rip_relative += 1;
        }
        if matches!(
            insn.op0_kind(),
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
        ) {
            detour.branches += 1;
        }
        detour.instructions += 1;
        detour.displaced += insn.len() as u64;
    }
    Ok(detour)
}

/// Append to `out` the target of every direct jump, conditional jump and
/// call in `code` (decoded linearly from `ip`). Undecodable bytes are
/// skipped one at a time.
pub fn direct_branch_targets(ip: u64, code: &[u8], out: &mut Vec<u64>) {
    let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let mut insn = iced_x86::Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut insn);
        // The operand kind is a field; the flow control a table lookup:
        // test the cheap one first (almost no instruction is a branch).
        let direct = matches!(
            insn.op0_kind(),
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
        ) && matches!(
            insn.flow_control(),
            FlowControl::UnconditionalBranch
                | FlowControl::ConditionalBranch
                | FlowControl::Call
                | FlowControl::XbeginXabortXend
        );
        if direct {
            out.push(insn.near_branch_target());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_prologue() {
        // push rbp; mov rbp,rsp; sub rsp,16; ...
        let code = [0x55, 0x48, 0x89, 0xe5, 0x48, 0x83, 0xec, 0x10, 0xc9, 0xc3];
        let d = analyze_detour(0x1000, &code).unwrap();
        assert_eq!((d.patch_at, d.displaced, d.instructions), (0x1000, 8, 3));
        assert!(d.overwrites(0x1001) && d.overwrites(0x1007));
        assert!(!d.overwrites(0x1000) && !d.overwrites(0x1008));
    }

    #[test]
    fn endbr_stays_in_place() {
        let mut code = ENDBR64.to_vec();
        code.extend_from_slice(&[0x48, 0x8b, 0x05, 0x10, 0x00, 0x00, 0x00, 0xc3]); // mov rax,[rip+16]; ret
        let d = analyze_detour(0x1000, &code).unwrap();
        assert_eq!((d.patch_at, d.displaced, d.rip_relative), (0x1004, 7, 1));
    }

    #[test]
    fn tail_jump_of_a_tiny_function() {
        let code = [0xe9, 0x00, 0x10, 0x00, 0x00]; // jmp elsewhere
        let d = analyze_detour(0x1000, &code).unwrap();
        assert_eq!((d.displaced, d.branches), (5, 1));
    }

    #[test]
    fn short_branch_in_the_displaced_bytes() {
        // test edi,edi; je +3; mov eax,1; ret
        let code = [0x85, 0xff, 0x74, 0x05, 0xb8, 0x01, 0x00, 0x00, 0x00, 0xc3];
        let d = analyze_detour(0x1000, &code).unwrap();
        assert_eq!((d.displaced, d.branches), (9, 1));
    }

    #[test]
    fn refusals() {
        assert_eq!(analyze_detour(0x1000, &[]), Err(DetourRefusal::UnknownSize));
        assert_eq!(
            analyze_detour(0x1000, &[0x31, 0xc0, 0xc3]),
            Err(DetourRefusal::TooSmall { size: 3, needed: 5 })
        );
        // endbr64; xor eax,eax; ret: 7 bytes, 9 needed.
        assert!(matches!(
            analyze_detour(0x1000, &[0xf3, 0x0f, 0x1e, 0xfa, 0x31, 0xc0, 0xc3]),
            Err(DetourRefusal::TooSmall { size: 7, needed: 9 })
        ));
        // xor eax,eax; mov eax,1 cut by the symbol's end.
        assert!(matches!(
            analyze_detour(0x1000, &[0x31, 0xc0, 0xb8, 0x01, 0x00, 0x00]),
            Err(DetourRefusal::TooSmall { .. })
        ));
        // loop -2 in the first bytes.
        assert!(matches!(
            analyze_detour(0x1000, &[0xe2, 0xfe, 0x90, 0x90, 0x90, 0xc3]),
            Err(DetourRefusal::Unrelocatable { at: 0x1000, .. })
        ));
        // jrcxz after a nop.
        assert!(matches!(
            analyze_detour(0x1000, &[0x90, 0xe3, 0x02, 0x90, 0x90, 0xc3]),
            Err(DetourRefusal::Unrelocatable { at: 0x1001, .. })
        ));
        assert_eq!(
            analyze_detour(0x1000, &[0xcc, 0x90, 0x90, 0x90, 0x90, 0xc3]),
            Err(DetourRefusal::Breakpoint { at: 0x1000 })
        );
        assert_eq!(
            analyze_detour(0x1000, &[0x06, 0x90, 0x90, 0x90, 0x90, 0xc3]),
            Err(DetourRefusal::Undecodable { at: 0x1000 })
        );
    }

    #[test]
    fn branch_targets() {
        // je +2; call +0; jmp -9; jmp rax
        let code = [0x74, 0x02, 0xe8, 0x00, 0x00, 0x00, 0x00, 0xeb, 0xf7, 0xff, 0xe0];
        let mut out = Vec::new();
        direct_branch_targets(0x1000, &code, &mut out);
        assert_eq!(out, vec![0x1004, 0x1007, 0x1000]);
    }

    proptest! {
        #[test]
        fn never_panics_and_stays_inside(code in proptest::collection::vec(any::<u8>(), 0..32)) {
            if let Ok(d) = analyze_detour(0x4000, &code) {
                prop_assert!(d.displaced >= NEAR_JUMP_LEN as u64);
                prop_assert!(d.patch_at + d.displaced <= 0x4000 + code.len() as u64);
            }
            let mut out = Vec::new();
            direct_branch_targets(0x4000, &code, &mut out);
        }
    }
}
