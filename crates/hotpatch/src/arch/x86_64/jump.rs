//! The three jumps a patch writes, encoded by iced-x86 with range checks.

use iced_x86::{Code, Encoder, Instruction, MemoryOperand, Register};

/// `eb rel8`: the 2-byte jump written at a prepared entry.
pub const SHORT_JUMP_LEN: usize = 2;
/// `e9 rel32`: a near jump, used for detours and to reach a trampoline.
pub const NEAR_JUMP_LEN: usize = 5;
/// `ff 25 disp32`: `jmp [rip+disp32]`, through an 8-byte slot.
pub const SLOT_JUMP_LEN: usize = 6;

/// A jump that cannot be encoded because its target is out of reach.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{form} at {from:#x} cannot reach {to:#x} ({distance:+} bytes; limit ±{limit})")]
pub struct JumpOutOfRange {
    pub form: &'static str,
    pub from: u64,
    pub to: u64,
    pub distance: i128,
    pub limit: i128,
}

fn encode<const N: usize>(
    form: &'static str,
    limit: i128,
    from: u64,
    to: u64,
    instruction: Result<Instruction, iced_x86::IcedError>,
) -> Result<[u8; N], JumpOutOfRange> {
    let err = || JumpOutOfRange {
        form,
        from,
        to,
        distance: i128::from(to) - i128::from(from) - N as i128,
        limit,
    };
    let instruction = instruction.map_err(|_| err())?;
    let mut encoder = Encoder::new(64);
    match encoder.encode(&instruction, from) {
        Ok(len) if len == N => encoder.take_buffer().try_into().map_err(|_| err()),
        _ => Err(err()),
    }
}

/// `jmp rel8` at `from` to `to`.
pub fn short_jump(from: u64, to: u64) -> Result<[u8; SHORT_JUMP_LEN], JumpOutOfRange> {
    encode(
        "jmp rel8",
        128,
        from,
        to,
        Instruction::with_branch(Code::Jmp_rel8_64, to),
    )
}

/// `jmp rel32` at `from` to `to`.
pub fn near_jump(from: u64, to: u64) -> Result<[u8; NEAR_JUMP_LEN], JumpOutOfRange> {
    encode(
        "jmp rel32",
        1 << 31,
        from,
        to,
        Instruction::with_branch(Code::Jmp_rel32_64, to),
    )
}

/// `jmp qword [rip+disp32]` at `from`, reading its target from `slot`.
pub fn slot_jump(from: u64, slot: u64) -> Result<[u8; SLOT_JUMP_LEN], JumpOutOfRange> {
    encode(
        "jmp [rip+disp32]",
        1 << 31,
        from,
        slot,
        Instruction::with1(
            Code::Jmp_rm64,
            MemoryOperand::with_base_displ(Register::RIP, slot as i64),
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_encodings() {
        assert_eq!(short_jump(0x1006, 0x1000).unwrap(), [0xeb, 0xf8]);
        assert_eq!(near_jump(0x1000, 0x1000).unwrap(), [0xe9, 0xfb, 0xff, 0xff, 0xff]);
        assert_eq!(
            slot_jump(0x1000, 0x2000).unwrap(),
            [0xff, 0x25, 0xfa, 0x0f, 0x00, 0x00]
        );
        assert!(short_jump(0x1000, 0x1000 + 2 + 128).is_err());
        assert!(short_jump(0x1000, 0x1000 + 2 + 127).is_ok());
        assert!(short_jump(0x1000, 0x1000 + 2 - 128).is_ok());
        assert!(short_jump(0x1000, 0x1000 + 2 - 129).is_err());
    }

    proptest! {
        // The displacement is checked by plain arithmetic here, not by
        // decoding with the library that encoded it.
        #[test]
        fn short_jump_matches_arithmetic(from in 0x1000u64..u64::MAX / 2, delta in -300i64..300) {
            let to = (from as i64 + delta) as u64;
            let rel = delta - 2;
            match short_jump(from, to) {
                Ok(b) => {
                    prop_assert!((-128..=127).contains(&rel));
                    prop_assert_eq!(b, [0xeb, rel as i8 as u8]);
                }
                Err(e) => {
                    prop_assert!(!(-128..=127).contains(&rel));
                    prop_assert_eq!(e.distance, i128::from(rel));
                }
            }
        }

        #[test]
        fn near_jump_matches_arithmetic(from in 1u64 << 32..1u64 << 46, delta in -(1i64 << 33)..(1i64 << 33)) {
            let to = (from as i64 + delta) as u64;
            let rel = delta - 5;
            match near_jump(from, to) {
                Ok(b) => {
                    prop_assert!(i32::try_from(rel).is_ok());
                    prop_assert_eq!(b[0], 0xe9);
                    prop_assert_eq!(i32::from_le_bytes([b[1], b[2], b[3], b[4]]) as i64, rel);
                }
                Err(_) => prop_assert!(i32::try_from(rel).is_err()),
            }
        }

        #[test]
        fn slot_jump_matches_arithmetic(from in 1u64 << 32..1u64 << 46, delta in -(1i64 << 33)..(1i64 << 33)) {
            let slot = (from as i64 + delta) as u64;
            let rel = delta - 6;
            match slot_jump(from, slot) {
                Ok(b) => {
                    prop_assert!(i32::try_from(rel).is_ok());
                    prop_assert_eq!(&b[..2], &[0xff, 0x25]);
                    prop_assert_eq!(i32::from_le_bytes([b[2], b[3], b[4], b[5]]) as i64, rel);
                }
                Err(_) => prop_assert!(i32::try_from(rel).is_err()),
            }
        }
    }
}
