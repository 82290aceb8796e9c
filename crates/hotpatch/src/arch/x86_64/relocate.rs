//! Moving the instructions a detour overwrites into a trampoline, so the
//! original function stays callable: whole instructions, re-encoded at the
//! trampoline's address by iced-x86's `BlockEncoder` (short branches
//! widened, `rip`-relative operands and branch targets fixed), followed by
//! a jump back to the first instruction that was not moved.

use super::detour::unrelocatable;
use super::format_instruction;
use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Decoder, DecoderOptions, Instruction, InstructionBlock,
};

/// Room to reserve for one trampoline: the moved instructions may grow
/// (a `jcc rel8` becomes `jcc rel32`; a far target becomes an indirect
/// jump through a constant) plus the jump back.
pub const TRAMPOLINE_SIZE: u64 = 96;

/// Why the displaced instructions cannot be moved to `at`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot relocate the instructions at {from:#x} to {at:#x}: {what}")]
pub struct RelocError {
    pub from: u64,
    pub at: u64,
    pub what: String,
}

/// The trampoline for the instructions `code` (whole ones) that sit at
/// `from`, to be placed at `at`. Running it is running `code` in place and
/// falling through to `from + code.len()`.
pub fn relocate(from: u64, code: &[u8], at: u64) -> Result<Vec<u8>, RelocError> {
    let err = |what: String| RelocError { from, at, what };
    let mut decoder = Decoder::with_ip(64, code, from, DecoderOptions::NONE);
    let mut instructions: Vec<Instruction> = Vec::new();
    while decoder.can_decode() {
        let insn = decoder.decode();
        if insn.is_invalid() {
            return Err(err(format!("undecodable or cut instruction at {:#x}", insn.ip())));
        }
        if unrelocatable(insn.mnemonic()) {
            return Err(err(format!(
                "`{}` at {:#x} has no relocatable form",
                format_instruction(&insn),
                insn.ip()
            )));
        }
        instructions.push(insn);
    }
    let resume = from + code.len() as u64;
    // The jump back keeps IP 0: BlockEncoder maps branch targets to the
    // instructions of the block by IP, and the jump's own target must stay
    // the original code, not the jump itself.
    let back = Instruction::with_branch(Code::Jmp_rel32_64, resume).map_err(|e| err(e.to_string()))?;
    instructions.push(back);
    let encoded = BlockEncoder::encode(
        64,
        InstructionBlock::new(&instructions, at),
        BlockEncoderOptions::NONE,
    )
    .map_err(|e| err(e.to_string()))?;
    if encoded.code_buffer.len() as u64 > TRAMPOLINE_SIZE {
        return Err(err(format!(
            "{} bytes, more than {TRAMPOLINE_SIZE}",
            encoded.code_buffer.len()
        )));
    }
    Ok(encoded.code_buffer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::{analyze_detour, decode_one, jump};
    use iced_x86::Mnemonic;
    use std::num::NonZeroUsize;

    /// An executable page in this process, for running relocated code.
    struct Page {
        base: *mut u8,
        len: usize,
    }

    impl Page {
        fn new() -> Page {
            use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous};
            let len = 0x4000;
            // SAFETY: a fresh anonymous mapping, not aliased by anything.
            let p = unsafe {
                mmap_anonymous(
                    None,
                    NonZeroUsize::new(len).unwrap(),
                    ProtFlags::PROT_READ | ProtFlags::PROT_WRITE | ProtFlags::PROT_EXEC,
                    MapFlags::MAP_PRIVATE,
                )
            }
            .expect("mmap");
            Page {
                base: p.as_ptr().cast(),
                len,
            }
        }

        fn addr(&self, offset: usize) -> u64 {
            self.base as u64 + offset as u64
        }

        fn write(&self, offset: usize, bytes: &[u8]) {
            assert!(offset + bytes.len() <= self.len);
            // SAFETY: in bounds of our own mapping; no code runs from it
            // while we write.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(offset), bytes.len()) }
        }

        /// Call the code at `offset` as `extern "C" fn(i64) -> i64`.
        fn call(&self, offset: usize, arg: i64) -> i64 {
            // SAFETY: the tests put complete functions with this signature
            // (SysV ABI, ending in ret) at the offsets they call.
            let f: extern "C" fn(i64) -> i64 = unsafe { std::mem::transmute(self.base.add(offset)) };
            f(arg)
        }
    }

    impl Drop for Page {
        fn drop(&mut self) {
            // SAFETY: unmapping the mapping made in `new`; nothing refers to it any more.
            let _ = unsafe {
                nix::sys::mman::munmap(std::ptr::NonNull::new(self.base.cast()).unwrap(), self.len)
            };
        }
    }

    const FUNCTION: usize = 0x0;
    const HELPER: usize = 0x200;
    const DATA: usize = 0x400;
    const REPLACEMENT: usize = 0x600;
    const TRAMPOLINE: usize = 0x800;

    /// Put `code` (built knowing its address) at FUNCTION, a helper that
    /// returns 41 at HELPER, a replacement returning 999, and 42 at DATA.
    /// Then detour FUNCTION to the replacement, with the moved instructions
    /// in a trampoline. Returns (original result, patched result,
    /// trampoline result) for `arg`.
    fn detour_and_run(code: impl Fn(&Page) -> Vec<u8>, args: &[i64]) -> Vec<(i64, i64, i64)> {
        let page = Page::new();
        page.write(HELPER, &[0xb8, 41, 0, 0, 0, 0xc3]); // mov eax, 41; ret
        page.write(REPLACEMENT, &[0x48, 0xc7, 0xc0, 0xe7, 0x03, 0, 0, 0xc3]); // mov rax, 999; ret
        page.write(DATA, &42u64.to_le_bytes());
        let bytes = code(&page);
        page.write(FUNCTION, &bytes);
        let before: Vec<i64> = args.iter().map(|&a| page.call(FUNCTION, a)).collect();

        let f = page.addr(FUNCTION);
        let d = analyze_detour(f, &bytes).expect("detourable");
        let moved = &bytes[(d.patch_at - f) as usize..(d.patch_at - f + d.displaced) as usize];
        let tramp = relocate(d.patch_at, moved, page.addr(TRAMPOLINE)).expect("relocatable");
        // Every relocated instruction decodes, and the last jumps back.
        let mut dec = Decoder::with_ip(64, &tramp, page.addr(TRAMPOLINE), DecoderOptions::NONE);
        let decoded: Vec<Instruction> = (&mut dec).into_iter().collect();
        assert!(decoded.iter().all(|i| !i.is_invalid()));
        let last = decoded.last().unwrap();
        assert_eq!(
            (last.mnemonic(), last.near_branch_target()),
            (Mnemonic::Jmp, d.patch_at + d.displaced)
        );
        page.write(TRAMPOLINE, &tramp);
        let jmp = jump::near_jump(d.patch_at, page.addr(REPLACEMENT)).unwrap();
        page.write((d.patch_at - page.addr(0)) as usize, &jmp);
        assert_eq!(
            decode_one(&jmp, d.patch_at).near_branch_target(),
            page.addr(REPLACEMENT)
        );
        // With endbr64 first, the original is entered at the endbr64... which
        // now jumps to the replacement; the callable original is the trampoline.
        args.iter()
            .zip(before)
            .map(|(&a, b)| (b, page.call(FUNCTION, a), page.call(TRAMPOLINE, a)))
            .collect()
    }

    fn rel32(from_end: u64, to: u64) -> [u8; 4] {
        (to.wrapping_sub(from_end) as i32).to_le_bytes()
    }

    #[test]
    fn rip_relative_load() {
        // mov rax, [rip+DATA]; add rax, rdi; ret
        let r = detour_and_run(
            |p| {
                let mut c = vec![0x48, 0x8b, 0x05];
                c.extend_from_slice(&rel32(p.addr(FUNCTION + 7), p.addr(DATA)));
                c.extend_from_slice(&[0x48, 0x01, 0xf8, 0xc3]);
                c
            },
            &[0, 8],
        );
        assert_eq!(r, vec![(42, 999, 42), (50, 999, 50)]);
    }

    #[test]
    fn short_conditional_branch_in_the_moved_bytes() {
        // test rdi,rdi; je L; mov eax,1; ret; L: mov eax,2; ret
        let r = detour_and_run(
            |_| {
                vec![
                    0x48, 0x85, 0xff, 0x74, 0x06, 0xb8, 1, 0, 0, 0, 0xc3, 0xb8, 2, 0, 0, 0, 0xc3,
                ]
            },
            &[0, 5],
        );
        assert_eq!(r, vec![(2, 999, 2), (1, 999, 1)]);
    }

    #[test]
    fn call_in_the_moved_bytes() {
        // call HELPER; add eax, 1; ret   (the call's return lands in the trampoline)
        let r = detour_and_run(
            |p| {
                let mut c = vec![0xe8];
                c.extend_from_slice(&rel32(p.addr(FUNCTION + 5), p.addr(HELPER)));
                c.extend_from_slice(&[0x83, 0xc0, 0x01, 0xc3]);
                c
            },
            &[0],
        );
        assert_eq!(r, vec![(42, 999, 42)]);
    }

    #[test]
    fn endbr64_first() {
        // endbr64; lea rax,[rdi+3]; nop; ret   (moved: lea + nop, after endbr64)
        let r = detour_and_run(
            |_| vec![0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x8d, 0x47, 0x03, 0x90, 0x90, 0xc3],
            &[4],
        );
        assert_eq!(r, vec![(7, 999, 7)]);
    }

    #[test]
    fn tiny_function_ending_in_a_tail_jump() {
        // jmp HELPER
        let r = detour_and_run(
            |p| {
                let mut c = vec![0xe9];
                c.extend_from_slice(&rel32(p.addr(FUNCTION + 5), p.addr(HELPER)));
                c
            },
            &[0],
        );
        assert_eq!(r, vec![(41, 999, 41)]);
    }

    #[test]
    fn branch_between_moved_instructions() {
        // test rdi,rdi; jne +1 (over the nop, inside the moved bytes); nop; mov eax,7; ret
        let r = detour_and_run(
            |_| vec![0x48, 0x85, 0xff, 0x75, 0x01, 0x90, 0xb8, 7, 0, 0, 0, 0xc3],
            &[0, 1],
        );
        assert_eq!(r, vec![(7, 999, 7), (7, 999, 7)]);
    }

    #[test]
    fn refuses_loop_and_cut_instructions() {
        assert!(relocate(0x1000, &[0xe2, 0xfe, 0x90, 0x90, 0x90], 0x2000).is_err());
        assert!(relocate(0x1000, &[0x90, 0xb8, 0x01], 0x2000).is_err());
        // A rip-relative operand out of reach of the trampoline (data in the
        // low 4 GiB would still be reached, with an addr32 prefix).
        let far = relocate(
            0x5555_0000_1000,
            &[0x48, 0x8b, 0x05, 0, 0, 0, 0],
            0x7000_0000_0000,
        )
        .unwrap_err();
        assert_eq!(far.at, 0x7000_0000_0000);
    }
}
