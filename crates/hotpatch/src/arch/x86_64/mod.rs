//! x86-64: jump encoding, entry classification, and the live-flip safety
//! proof for prepared functions (DESIGN.md §2, §3).

pub mod detour;
pub mod entry;
pub mod jump;
pub mod relocate;

pub use detour::{Detour, DetourRefusal, analyze_detour, direct_branch_targets};

pub use entry::{EntryNops, FlipHazard, FlipPlan, LongJump, PreparedEntry, plan_flip, recognize_prepared};

use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter};

/// Decode the single instruction at `ip` from `bytes`.
pub fn decode_one(bytes: &[u8], ip: u64) -> Instruction {
    Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE).decode()
}

/// Intel-syntax text of an instruction, for messages.
pub fn format_instruction(instruction: &Instruction) -> String {
    let mut out = String::new();
    IntelFormatter::new().format(instruction, &mut out);
    out
}
