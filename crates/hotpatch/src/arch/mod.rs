//! Instruction-set knowledge. Pure: bytes in, facts and bytes out.

pub mod x86_64;
