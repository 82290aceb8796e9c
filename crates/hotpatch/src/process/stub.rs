//! The machine code a hijacked thread runs (pure: no I/O).
//!
//! Two stubs:
//!
//! - the **session stub**, in the code page of a region we mapped in the
//!   target ([`Layout`]): saves the extended state, calls a function with
//!   the SysV ABI, stores the result, restores every register from a frame
//!   the tool wrote, sets a done flag and returns to the interrupted code.
//! - the **cave stub**, written for one use into zero padding at the end of
//!   an executable mapping, before the target has any page of ours: runs
//!   one or two raw system calls (the `mmap` that creates the region) and
//!   returns to the interrupted code with the values baked into it.
//!
//! Neither ever traps: if the tool dies after `PTRACE_SETREGS`, the kernel
//! detaches and the thread still finishes the stub and resumes correctly.

use iced_x86::{BlockEncoderOptions, Code, IcedError, Instruction, MemoryOperand, Register};

/// The x86-64 SysV red zone below `rsp` that leaf code may use.
pub const RED_ZONE: u64 = 128;

/// `__NR_restart_syscall`.
pub const NR_RESTART_SYSCALL: u64 = 219;

const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;

/// Where a thread stopped at (`rip`, `rax`, `orig_rax`) must resume so that
/// it behaves as if the kernel had resumed it: an interrupted system call is
/// restarted the way `arch_do_signal_or_restart` would (no handler ran, so
/// `-ERESTARTNOHAND` restarts too). The hijacked registers carry
/// `orig_rax = -1`, so the kernel applies no restart logic itself.
pub fn resume_point(rip: u64, rax: u64, orig_rax: u64) -> (u64, u64) {
    if (orig_rax as i64) < 0 {
        return (rip, rax);
    }
    match -(rax as i64) {
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => (rip.wrapping_sub(2), orig_rax),
        ERESTART_RESTARTBLOCK => (rip.wrapping_sub(2), NR_RESTART_SYSCALL),
        _ => (rip, rax),
    }
}

/// Offsets in the session frame (from [`Layout::frame`]).
pub mod frame {
    /// Function to call.
    pub const FN: u64 = 0x00;
    /// Six integer arguments (rdi, rsi, rdx, rcx, r8, r9).
    pub const ARGS: u64 = 0x08;
    /// `__errno_location` of the target, or 0: errno is saved around the
    /// call and restored, and its value after the call is reported.
    pub const ERRNO_FN: u64 = 0x38;
    /// The function's return value (rax).
    pub const RESULT: u64 = 0x40;
    /// errno right after the call.
    pub const ERRNO_AFTER: u64 = 0x48;
    /// errno of the interrupted code.
    pub const SAVED_ERRNO: u64 = 0x50;
    /// `rsp` of the interrupted code − 136: holds the resume `rip`.
    pub const RET_RSP: u64 = 0x58;
    pub const RFLAGS: u64 = 0x60;
    /// rax rbx rcx rdx rsi rdi rbp r8 r9 r10 r11 r12 r13 r14 r15.
    pub const GPRS: u64 = 0x68;
    /// System call number for the syscall helper.
    pub const NR: u64 = 0xe0;
    /// Set to 1 by the stub once nothing of this frame is needed any more;
    /// set to 0 by the tool with the rest of the frame, before
    /// `PTRACE_SETREGS`: 1 means no call can be using the frame. A region
    /// nobody called yet holds 1.
    pub const DONE: u64 = 0xe8;
    /// Written by the bootstrap: [`super::BOOT_MAGIC`] | mprotect result << 32.
    pub const BOOT: u64 = 0xf0;
    /// The tid of the thread the last call was given to (written before
    /// `PTRACE_SETREGS`; 0 before the first call).
    pub const OWNER: u64 = 0xf8;
    /// The XSAVE area (64-byte aligned).
    pub const XSAVE: u64 = 0x100;
}

/// The bootstrap marker ("hpat"); below 2^31 so `or r64, imm32` keeps it.
pub const BOOT_MAGIC: u32 = 0x7461_7068;

/// GPRs in frame order.
pub const GPR_ORDER: [&str; 15] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
];

/// A session region: `[code page (RX)][call stack (RW)][frame, XSAVE area,
/// scratch (RW)]`. A stack overflow runs into the code page and faults
/// instead of corrupting anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub base: u64,
    pub xsave_size: u64,
}

pub const CODE_SIZE: u64 = 0x1000;
/// The stack the called function runs on (lazily allocated by the kernel).
pub const STACK_SIZE: u64 = 1 << 20;
/// Scratch bytes for strings passed to remote calls.
pub const SCRATCH_SIZE: u64 = 0x1000;
/// What a session records for the next one (the target's libc functions),
/// after the scratch bytes.
pub const INFO_SIZE: u64 = 0x1000;

impl Layout {
    pub fn new(base: u64, xsave_size: u64) -> Layout {
        Layout { base, xsave_size }
    }

    /// Total bytes to map, a whole number of pages.
    pub fn size(&self) -> u64 {
        Self::size_for(self.xsave_size)
    }

    pub fn size_for(xsave_size: u64) -> u64 {
        let data = frame::XSAVE + xsave_size.next_multiple_of(64) + SCRATCH_SIZE + INFO_SIZE;
        CODE_SIZE + STACK_SIZE + data.next_multiple_of(0x1000)
    }

    pub fn code(&self) -> u64 {
        self.base
    }

    /// The frame; also the top of the call stack (`rsp` at stub entry).
    pub fn frame(&self) -> u64 {
        self.base + CODE_SIZE + STACK_SIZE
    }

    pub fn scratch(&self) -> u64 {
        self.frame() + frame::XSAVE + self.xsave_size.next_multiple_of(64)
    }

    pub fn info(&self) -> u64 {
        self.scratch() + SCRATCH_SIZE
    }

    pub fn end(&self) -> u64 {
        self.base + self.size()
    }
}

/// Assembled session stub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionStub {
    pub bytes: Vec<u8>,
    /// Where the hijacked thread starts (`rsp` = [`Layout::frame`]).
    pub entry: u64,
    /// A function `(a0..a5) -> rax` doing raw system call `frame::NR`.
    pub syscall_helper: u64,
    /// The final `ret 128`: a thread here has finished with the frame.
    pub ret_ip: u64,
}

fn rip_rel(addr: u64) -> MemoryOperand {
    MemoryOperand::with_base_displ(Register::RIP, addr as i64)
}

/// The session stub for a region at `layout`.
pub fn session_stub(layout: &Layout) -> Result<SessionStub, IcedError> {
    use frame::*;
    use iced_x86::code_asm::*;
    let f = |off: u64| qword_ptr(rsp + off as i32);
    let mut a = CodeAssembler::new(64)?;
    let mut no_errno1 = a.create_label();
    let mut no_errno2 = a.create_label();
    let mut ret_label = a.create_label();
    let mut helper = a.create_label();

    // Extended state: zero the XSAVE header (XRSTOR faults on garbage in
    // it), then save every component XCR0 enables.
    a.xor(eax, eax)?;
    for i in 0..8u64 {
        a.mov(f(XSAVE + 512 + 8 * i), rax)?;
    }
    a.mov(eax, -1i32)?;
    a.mov(edx, -1i32)?;
    a.xsave64(ptr(rsp + XSAVE as i32))?;
    a.cld()?;
    // errno of the interrupted code.
    a.mov(r11, f(ERRNO_FN))?;
    a.test(r11, r11)?;
    a.jz(no_errno1)?;
    a.call(r11)?;
    a.mov(eax, dword_ptr(rax))?;
    a.mov(f(SAVED_ERRNO), rax)?;
    a.set_label(&mut no_errno1)?;
    // The call. rsp is 16-aligned here (the frame is page-aligned).
    for (i, r) in [rdi, rsi, rdx, rcx, r8, r9].into_iter().enumerate() {
        a.mov(r, f(ARGS + 8 * i as u64))?;
    }
    a.mov(r11, f(FN))?;
    a.xor(eax, eax)?; // al = 0 vector registers, for variadic callees
    a.call(r11)?;
    a.mov(f(RESULT), rax)?;
    a.mov(r11, f(ERRNO_FN))?;
    a.test(r11, r11)?;
    a.jz(no_errno2)?;
    a.call(r11)?;
    a.mov(ecx, dword_ptr(rax))?;
    a.mov(f(ERRNO_AFTER), rcx)?;
    a.mov(rcx, f(SAVED_ERRNO))?;
    a.mov(dword_ptr(rax), ecx)?;
    a.set_label(&mut no_errno2)?;
    // Restore everything.
    a.mov(eax, -1i32)?;
    a.mov(edx, -1i32)?;
    a.xrstor64(ptr(rsp + XSAVE as i32))?;
    a.push(f(RFLAGS))?;
    a.popfq()?;
    let gprs = [
        rax, rbx, rcx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13, r14, r15,
    ];
    for (i, r) in gprs.into_iter().enumerate() {
        a.mov(r, f(GPRS + 8 * i as u64))?;
    }
    // rsp = original rsp − 136, where the resume rip waits, below the
    // interrupted code's red zone. From here on the frame is not read: set
    // done (rip-relative, no register, no flags), then `ret 128` pops the
    // resume rip and lands on the original rsp. A signal in between puts
    // its frame below rsp − 128 and cannot touch that slot.
    a.mov(rsp, f(RET_RSP))?;
    a.add_instruction(Instruction::with2(
        Code::Mov_rm32_imm32,
        rip_rel(layout.frame() + DONE),
        1u32,
    )?)?;
    a.set_label(&mut ret_label)?;
    a.ret_1(RED_ZONE as u32)?;
    // The syscall helper, called like a function.
    a.set_label(&mut helper)?;
    a.add_instruction(Instruction::with2(
        Code::Mov_r64_rm64,
        Register::RAX,
        rip_rel(layout.frame() + NR),
    )?)?;
    a.mov(r10, rcx)?;
    a.syscall()?;
    a.ret()?;
    let out = a.assemble_options(layout.code(), BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
    Ok(SessionStub {
        entry: layout.code(),
        syscall_helper: out.label_ip(&helper)?,
        ret_ip: out.label_ip(&ret_label)?,
        bytes: out.inner.code_buffer,
    })
}

/// What the bootstrap runs from a cave: raw system call `nr(args)`; if it
/// succeeded, optionally `then.0(then.1)`, and optionally store
/// `BOOT_MAGIC | (rax << 32)` at `marker`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaveOp {
    pub nr: u64,
    pub args: [u64; 6],
    pub then: Option<(u64, [u64; 3])>,
    pub marker: Option<u64>,
}

/// Register values the cave stub restores (the syscall and the stub
/// clobber exactly these; everything else is left alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaveRestore {
    pub rax: u64,
    pub rcx: u64,
    pub r11: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub r10: u64,
    pub r8: u64,
    pub r9: u64,
    pub rip: u64,
}

/// How far below `rsp` the cave stub keeps rflags: below the red zone.
pub const CAVE_STACK_DROP: u64 = 256;

/// The cave stub at `addr`. Entry: `rax` = `op.nr`, `rdi rsi rdx r10 r8 r9`
/// = `op.args`, everything else as interrupted; rflags are preserved through
/// a slot at `rsp − 264` (under the red zone).
pub fn cave_stub(addr: u64, op: &CaveOp, restore: &CaveRestore) -> Result<Vec<u8>, IcedError> {
    use iced_x86::code_asm::*;
    let mut a = CodeAssembler::new(64)?;
    let mut out = a.create_label();
    let mut slot = a.create_label();
    a.lea(rsp, ptr(rsp - CAVE_STACK_DROP as i32))?;
    a.pushfq()?;
    a.syscall()?;
    if op.then.is_some() || op.marker.is_some() {
        a.cmp(rax, -4095i32)?;
        a.jae(out)?;
        if let Some((nr, args)) = op.then {
            a.mov(rdi, args[0])?;
            a.mov(rsi, args[1])?;
            a.mov(rdx, args[2])?;
            a.mov(rax, nr)?;
            a.syscall()?;
        }
        if let Some(marker) = op.marker {
            a.shl(rax, 32)?;
            a.or(rax, BOOT_MAGIC as i32)?;
            a.mov(rcx, marker)?;
            a.mov(qword_ptr(rcx), rax)?;
        }
    }
    a.set_label(&mut out)?;
    a.popfq()?;
    a.lea(rsp, ptr(rsp + CAVE_STACK_DROP as i32))?;
    let r = restore;
    for (reg, v) in [
        (rax, r.rax),
        (rcx, r.rcx),
        (r11, r.r11),
        (rdi, r.rdi),
        (rsi, r.rsi),
        (rdx, r.rdx),
        (r10, r.r10),
        (r8, r.r8),
        (r9, r.r9),
    ] {
        a.mov(reg, v)?;
    }
    a.jmp(qword_ptr(slot))?;
    a.set_label(&mut slot)?;
    a.dq(&[r.rip])?;
    a.assemble(addr)
}

/// Bytes the longest cave stub needs (with `then` and `marker`); callers
/// look for at least this many zero bytes.
pub const CAVE_MAX: usize = 200;

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

    fn disasm(bytes: &[u8], ip: u64) -> Vec<(u64, String)> {
        let mut d = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
        let mut f = IntelFormatter::new();
        let mut out = Vec::new();
        for ins in &mut d {
            assert!(!ins.is_invalid(), "invalid instruction at {:#x}", ins.ip());
            let mut s = String::new();
            f.format(&ins, &mut s);
            out.push((ins.ip(), s));
        }
        out
    }

    /// A number as the Intel formatter prints it.
    fn h(v: u64) -> String {
        if v < 10 {
            return v.to_string();
        }
        let s = format!("{v:X}");
        if s.starts_with(|c: char| c.is_ascii_alphabetic()) {
            format!("0{s}h")
        } else {
            format!("{s}h")
        }
    }

    fn text(lines: &[(u64, String)]) -> Vec<&str> {
        lines.iter().map(|(_, s)| s.as_str()).collect()
    }

    #[test]
    fn restart_rules() {
        let rip = 0x7f00_0000_1234;
        let neg = |e: i64| (-e) as u64;
        // Not in a system call: untouched, whatever rax says.
        assert_eq!(resume_point(rip, neg(512), u64::MAX), (rip, neg(512)));
        for e in [512, 513, 514] {
            assert_eq!(resume_point(rip, neg(e), 0), (rip - 2, 0), "-{e}");
            assert_eq!(resume_point(rip, neg(e), 202), (rip - 2, 202), "-{e}");
        }
        assert_eq!(resume_point(rip, neg(516), 35), (rip - 2, NR_RESTART_SYSCALL));
        // A finished system call, or -EINTR: the program sees the result.
        assert_eq!(resume_point(rip, 5, 0), (rip, 5));
        assert_eq!(resume_point(rip, neg(4), 232), (rip, neg(4)));
        assert_eq!(resume_point(rip, neg(515), 0), (rip, neg(515)));
    }

    #[test]
    fn layout_is_aligned() {
        let l = Layout::new(0x7f12_3456_0000, 11008);
        assert_eq!(l.frame() % 0x1000, 0);
        assert_eq!((l.frame() + frame::XSAVE) % 64, 0);
        assert_eq!(l.size() % 0x1000, 0);
        assert!(l.scratch() + SCRATCH_SIZE <= l.info());
        assert!(l.info() + INFO_SIZE <= l.end());
        const { assert!(frame::GPRS + 15 * 8 <= frame::NR) };
        const { assert!(frame::OWNER + 8 <= frame::XSAVE) };
    }

    #[test]
    fn session_stub_decodes_as_designed() {
        let l = Layout::new(0x7f12_3456_0000, 0xa80);
        let s = session_stub(&l).unwrap();
        assert!(s.bytes.len() < CODE_SIZE as usize);
        let lines = disasm(&s.bytes, l.code());
        let t = text(&lines);
        let frame = l.frame();
        // Header zeroing, then XSAVE with an all-ones mask.
        assert_eq!(t[0], "xor eax,eax");
        assert_eq!(t[1], "mov [rsp+300h],rax");
        assert_eq!(t[8], "mov [rsp+338h],rax");
        assert_eq!(
            &t[9..13],
            [
                "mov eax,0FFFFFFFFh",
                "mov edx,0FFFFFFFFh",
                "xsave64 [rsp+100h]",
                "cld"
            ]
        );
        // The call: arguments, function, al = 0.
        let call = t.iter().position(|s| *s == "mov r11,[rsp]").unwrap();
        assert_eq!(
            &t[call - 6..call + 4],
            [
                "mov rdi,[rsp+8]",
                "mov rsi,[rsp+10h]",
                "mov rdx,[rsp+18h]",
                "mov rcx,[rsp+20h]",
                "mov r8,[rsp+28h]",
                "mov r9,[rsp+30h]",
                "mov r11,[rsp]",
                "xor eax,eax",
                "call r11",
                "mov [rsp+40h],rax",
            ]
        );
        // The tail: XRSTOR, flags, every GPR, the return slot, done, ret 128.
        let xr = t.iter().position(|s| *s == "xrstor64 [rsp+100h]").unwrap();
        assert_eq!(&t[xr - 2..xr], ["mov eax,0FFFFFFFFh", "mov edx,0FFFFFFFFh"]);
        assert_eq!(&t[xr + 1..xr + 3], ["push qword ptr [rsp+60h]", "popfq"]);
        let restores: Vec<&str> = t[xr + 3..xr + 18].to_vec();
        for (i, name) in GPR_ORDER.iter().enumerate() {
            assert_eq!(
                restores[i],
                format!("mov {name},[rsp+{}]", h(0x68 + 8 * i as u64))
            );
        }
        assert_eq!(t[xr + 18], "mov rsp,[rsp+58h]");
        assert_eq!(
            t[xr + 19],
            format!("mov dword ptr [{}],1", h(frame + frame::DONE)).as_str()
        );
        assert_eq!(t[xr + 20], "ret 80h");
        assert_eq!(lines[xr + 20].0, s.ret_ip);
        // Nothing between the XSAVE and the XRSTOR touches rsp, except the
        // calls (balanced); nothing after the flags restore touches flags.
        for line in &t[xr + 3..xr + 21] {
            assert!(line.starts_with("mov ") || line.starts_with("ret"), "{line}");
        }
        // The helper.
        let hi = lines.iter().position(|(ip, _)| *ip == s.syscall_helper).unwrap();
        assert_eq!(
            &t[hi..],
            [
                format!("mov rax,[{}]", h(frame + frame::NR)).as_str(),
                "mov r10,rcx",
                "syscall",
                "ret"
            ]
        );
    }

    #[test]
    fn cave_stub_decodes_as_designed() {
        let addr = 0x7f00_0017_b0fc;
        let op = CaveOp {
            nr: 9,
            args: [0x7f55_0000_0000, 0x110000, 3, 0x100022, u64::MAX, 0],
            then: Some((10, [0x7f55_0000_0000, 0x1000, 5])),
            marker: Some(0x7f55_0010_10f0),
        };
        let r = CaveRestore {
            rax: 0,
            rcx: 0x11,
            r11: 0x246,
            rdi: 3,
            rsi: 0x7ffd_0000_1000,
            rdx: 100,
            r10: 0,
            r8: 0x88,
            r9: 0x99,
            rip: 0x7f00_0001_1232,
        };
        let bytes = cave_stub(addr, &op, &r).unwrap();
        assert!(bytes.len() <= CAVE_MAX, "{}", bytes.len());
        // The last 8 bytes are the resume rip, the jump before reads them.
        assert_eq!(bytes[bytes.len() - 8..], r.rip.to_le_bytes());
        let lines = disasm(&bytes[..bytes.len() - 8], addr);
        let t = text(&lines);
        let out_ip = lines.iter().find(|(_, s)| s == "popfq").unwrap().0;
        assert_eq!(
            t,
            [
                "lea rsp,[rsp-100h]",
                "pushfq",
                "syscall",
                "cmp rax,0FFFFFFFFFFFFF001h",
                format!("jae short {out_ip:016X}h").as_str(),
                "mov rdi,7F5500000000h",
                "mov rsi,1000h",
                "mov rdx,5",
                "mov rax,0Ah",
                "syscall",
                "shl rax,20h",
                "or rax,74617068h",
                "mov rcx,7F55001010F0h",
                "mov [rcx],rax",
                "popfq",
                "lea rsp,[rsp+100h]",
                "mov rax,0",
                "mov rcx,11h",
                "mov r11,246h",
                "mov rdi,3",
                "mov rsi,7FFD00001000h",
                "mov rdx,64h",
                "mov r10,0",
                "mov r8,88h",
                "mov r9,99h",
                format!("jmp qword ptr [{}]", h(addr + bytes.len() as u64 - 8)).as_str(),
            ]
        );
        // Without follow-up or marker: syscall straight to the restore.
        let plain = CaveOp {
            nr: 11,
            args: [0x7f55_0000_0000, 0x110000, 0, 0, 0, 0],
            then: None,
            marker: None,
        };
        let bytes = cave_stub(addr, &plain, &r).unwrap();
        let lines = disasm(&bytes[..bytes.len() - 8], addr);
        assert_eq!(
            &text(&lines)[..4],
            ["lea rsp,[rsp-100h]", "pushfq", "syscall", "popfq"]
        );
    }
}
