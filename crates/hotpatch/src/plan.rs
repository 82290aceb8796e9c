//! From a target image, a patch and where things landed in the process, to
//! the exact byte writes that flip each function — each with the bytes it
//! expects to replace. Pure: addresses in, writes out.
//!
//! Order (DESIGN.md §2): for every function of the patch, first the slot,
//! the trampoline if any, and the padding (nobody executes those yet); then
//! the entries, one byte at a time. Revert is the mirror image.

use crate::arch::x86_64::{FlipPlan, LongJump, jump};
use crate::image::{Image, LookupError, SymbolKind, find_symbol};
use crate::patchability::{Class, survey_function};

/// One compare-and-swap write into the target.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Write {
    pub address: u64,
    pub expected: Vec<u8>,
    pub new: Vec<u8>,
}

impl Write {
    /// The same write undone.
    pub fn inverse(&self) -> Write {
        Write {
            address: self.address,
            expected: self.new.clone(),
            new: self.expected.clone(),
        }
    }
}

/// Scratch memory for one function, within ±2 GiB of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scratch {
    /// An 8-byte, 8-aligned slot in a data page.
    pub slot: u64,
    /// 8 bytes of executable memory, for a [`LongJump::Trampoline`] plan.
    pub trampoline: Option<u64>,
}

/// How one prepared function is flipped to its replacement.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FunctionFlip {
    /// The target function's name, as the patch named it.
    pub name: String,
    /// Its entry in the process.
    pub entry: u64,
    pub slot: u64,
    /// The replacement's address in the process, stored in the slot.
    pub replacement: u64,
    /// Writes before the entry flips: slot (only when it was never live),
    /// trampoline, padding.
    pub prepare: Vec<Write>,
    /// The two single-byte entry writes, in order.
    pub entry_bytes: Vec<Write>,
    /// Whether the entry writes are proven safe with threads running.
    pub live_safe: bool,
    /// Where the original body can be called while the function is patched
    /// (just past the entry nops, which do nothing).
    pub original: u64,
}

/// Why a function cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error("{image}: `{name}` is a variable, not a function")]
    NotAFunction { image: String, name: String },
    #[error(
        "{image}: `{name}` is not prepared ({detail}); rebuild it with -fpatchable-function-entry=8,6, or patch it as unprepared code (the detour fallback)"
    )]
    NotPrepared {
        image: String,
        name: String,
        detail: String,
    },
    #[error("{image}: `{name}` cannot be patched: {detail}")]
    NotPatchable {
        image: String,
        name: String,
        detail: String,
    },
    #[error("{image}: `{name}`: {detail}")]
    OutOfRange {
        image: String,
        name: String,
        detail: String,
    },
}

/// Resolve `name` in `image` (loaded at `bias`) to a prepared function and
/// its flip plan, in file addresses.
pub fn prepared_function(image: &Image, name: &str) -> Result<(u64, FlipPlan), PlanError> {
    let image_name = image.path().display().to_string();
    let sym = find_symbol(image, name)?;
    if sym.kind != SymbolKind::Function {
        return Err(PlanError::NotAFunction {
            image: image_name,
            name: name.to_string(),
        });
    }
    match survey_function(image, sym.address) {
        Some(Class::Prepared { flip, .. }) => Ok((sym.address, flip)),
        Some(Class::Detourable { note, .. }) => Err(PlanError::NotPrepared {
            image: image_name,
            name: name.to_string(),
            detail: note.unwrap_or_else(|| "no padding before its entry".to_string()),
        }),
        Some(Class::NotPatchable { detail, .. }) => Err(PlanError::NotPatchable {
            image: image_name,
            name: name.to_string(),
            detail,
        }),
        None => Err(PlanError::NotPatchable {
            image: image_name,
            name: name.to_string(),
            detail: format!("no function starts at {:#x}", sym.address),
        }),
    }
}

/// The writes that make `flip` (file addresses of `image_name`, loaded at `bias`)
/// jump to `replacement` through `scratch`. `slot_live` says the slot
/// already holds a live pointer (then it is not written here: a live slot
/// changes with one atomic store inside the target).
pub fn flip_writes(
    name: &str,
    image_name: &str,
    bias: u64,
    flip: &FlipPlan,
    replacement: u64,
    scratch: Scratch,
) -> Result<FunctionFlip, PlanError> {
    let out_of_range = |detail: String| PlanError::OutOfRange {
        image: image_name.to_string(),
        name: name.to_string(),
        detail,
    };
    let at = |file_address: u64| file_address.wrapping_add(bias);
    let long_jump_at = at(flip.long_jump_at);
    let short_jump_at = at(flip.short_jump_at);
    let mut prepare = vec![Write {
        address: scratch.slot,
        expected: vec![0; 8],
        new: replacement.to_le_bytes().to_vec(),
    }];
    let padding_new: Vec<u8> = match flip.long_jump {
        LongJump::Slot => jump::slot_jump(long_jump_at, scratch.slot)
            .map_err(|e| out_of_range(e.to_string()))?
            .to_vec(),
        LongJump::Trampoline => {
            let trampoline = scratch
                .trampoline
                .ok_or_else(|| out_of_range("the plan needs a trampoline and none was given".into()))?;
            let bytes = jump::slot_jump(trampoline, scratch.slot).map_err(|e| out_of_range(e.to_string()))?;
            prepare.push(Write {
                address: trampoline,
                expected: vec![0; bytes.len()],
                new: bytes.to_vec(),
            });
            jump::near_jump(long_jump_at, trampoline)
                .map_err(|e| out_of_range(e.to_string()))?
                .to_vec()
        }
    };
    prepare.push(Write {
        address: long_jump_at,
        expected: vec![crate::arch::x86_64::entry::NOP; padding_new.len()],
        new: padding_new,
    });
    let first = flip.first_byte;
    let second = 1 - first;
    let entry_bytes = [first, second]
        .iter()
        .map(|&i| Write {
            address: short_jump_at + i as u64,
            expected: vec![flip.original[i]],
            new: vec![flip.short_jump[i]],
        })
        .collect();
    Ok(FunctionFlip {
        name: name.to_string(),
        entry: short_jump_at,
        slot: scratch.slot,
        replacement,
        prepare,
        entry_bytes,
        live_safe: flip.live_safe(),
        original: short_jump_at + 2,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::{decode_one, plan_flip, recognize_prepared};
    use iced_x86::{Mnemonic, OpKind};

    fn flip_for(endbr: bool) -> FlipPlan {
        let mut bytes = vec![0x90; 6];
        if endbr {
            bytes.extend_from_slice(&[0xf3, 0x0f, 0x1e, 0xfa]);
        }
        bytes.extend_from_slice(&[0x66, 0x90, 0x53, 0xc3]);
        let e = recognize_prepared(0x1000, 0x1006, &bytes).unwrap();
        plan_flip(&e, &[0x53, 0xc3]).unwrap()
    }

    fn apply(mem: &mut std::collections::HashMap<u64, u8>, w: &Write) {
        for (i, (&old, &new)) in w.expected.iter().zip(&w.new).enumerate() {
            let b = mem.entry(w.address + i as u64).or_insert(0);
            assert_eq!(*b, old, "CAS mismatch at {:#x}", w.address + i as u64);
            *b = new;
        }
    }

    /// Follow the patched code from the entry, by decoding, to the slot.
    fn follow(flip: FlipPlan, bias: u64) -> (u64, u64) {
        let slot = bias + 0x1000 + 0x7000_0000;
        let trampoline = bias + 0x1000 + 0x7000_1000;
        let f = flip_writes(
            "f",
            "img",
            bias,
            &flip,
            0x7fff_1234_5678,
            Scratch {
                slot,
                trampoline: Some(trampoline),
            },
        )
        .unwrap();
        let mut mem = std::collections::HashMap::new();
        // Memory before: nops in the padding, entry nops, zeros in scratch.
        for a in 0..6 {
            mem.insert(bias + 0x1000 + a, 0x90);
        }
        for (i, b) in flip.original.iter().enumerate() {
            mem.insert(f.entry + i as u64, *b);
        }
        for w in f.prepare.iter().chain(&f.entry_bytes) {
            apply(&mut mem, w);
        }
        let read = |mem: &std::collections::HashMap<u64, u8>, a: u64| -> Vec<u8> {
            (0..15).map(|i| mem.get(&(a + i)).copied().unwrap_or(0)).collect()
        };
        let mut pc = f.entry;
        for _ in 0..4 {
            let insn = decode_one(&read(&mem, pc), pc);
            assert_eq!(insn.mnemonic(), Mnemonic::Jmp);
            if insn.op0_kind() == OpKind::Memory {
                let slot_addr = insn.ip_rel_memory_address();
                let value = u64::from_le_bytes(read(&mem, slot_addr)[..8].try_into().unwrap());
                return (slot_addr, value);
            }
            pc = insn.near_branch_target();
        }
        panic!("no jump through the slot");
    }

    #[test]
    fn entry_reaches_the_replacement_through_the_slot() {
        for endbr in [false, true] {
            for bias in [0, 0x5555_5555_0000] {
                let (slot, value) = follow(flip_for(endbr), bias);
                assert_eq!(slot, bias + 0x1000 + 0x7000_0000);
                assert_eq!(value, 0x7fff_1234_5678);
            }
        }
    }

    #[test]
    fn slot_out_of_reach_is_an_error() {
        let e = flip_writes(
            "f",
            "img",
            0,
            &flip_for(false),
            1,
            Scratch {
                slot: 0x1_0000_0000_0000,
                trampoline: None,
            },
        )
        .unwrap_err();
        assert!(matches!(e, PlanError::OutOfRange { .. }), "{e}");
        let e = flip_writes(
            "f",
            "img",
            0,
            &flip_for(true),
            1,
            Scratch {
                slot: 0x2000,
                trampoline: None,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("trampoline"), "{e}");
    }

    #[test]
    fn inverse_swaps() {
        let w = Write {
            address: 5,
            expected: vec![1],
            new: vec![2],
        };
        assert_eq!(w.inverse().inverse(), w);
        assert_eq!(w.inverse().new, vec![1]);
    }
}
