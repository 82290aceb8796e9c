//! Programs a hijacked thread runs in one trip (pure: no I/O).
//!
//! A remote call runs one function. An apply needs a dozen things done
//! inside the target — map scratch pages, create a memfd, `dlopen` it,
//! store live slots, serialise the cores — with work of the tool's own in
//! between (filling the memfd, checking what `dlopen` returned, writing
//! entries). A [`Program`] does all of it in **one** remote call: a
//! straight line of system calls and function calls whose results go to a
//! data block the tool reads, with **rendezvous points** where the thread
//! publishes how far it got and waits (sleeping) until the tool says go.
//!
//! Every way out is the same `ret`: a step that fails (its check says
//! so), a rendezvous the tool aborts or cancels, or one the tool never
//! answers before the program's deadline (a killed or stalled tool). The
//! tool learns which from the data block and finishes the work with plain
//! remote calls; a program never does anything on its own that the tool
//! did not already decide (no cleanup of its own, no `dlclose`), so a
//! thread that gives up early leaves the target as safe as a tool that
//! stopped there.
//!
//! The code is assembled for one address (after the session stub, in the
//! call region's code page) and its data block is the region's scratch
//! area ([`DataBlock`]).

use iced_x86::IcedError;
use iced_x86::code_asm::*;

/// Offsets in the data block.
pub mod data {
    /// [`super::MAGIC`], written by the tool with the program: a later
    /// tool knows it may cancel a program waiting there.
    pub const MAGIC: u64 = 0x00;
    /// The last rendezvous the thread reached (u32, written by it).
    pub const PHASE: u64 = 0x08;
    /// The tool's answer (u32): a phase number to go on past it,
    /// [`super::ABORT`] or [`super::CANCEL`].
    pub const GO: u64 = 0x0c;
    /// 1 + index of the step whose check failed (u32), 0 if none.
    pub const FAILED: u64 = 0x10;
    /// The phase at which the thread stopped waiting without an answer
    /// (its deadline passed, or a later tool cancelled it), 0 if none.
    pub const GAVE_UP: u64 = 0x14;
    /// Set to 1 (u32) once the program has done everything it will do
    /// (it then only gives back a lent priority and returns).
    pub const ENDED: u64 = 0x18;
    /// Deadline, `CLOCK_MONOTONIC` nanoseconds of the target (u64): the
    /// program's start plus [`BUDGET`].
    pub const DEADLINE: u64 = 0x20;
    /// How long the program may wait in all, in nanoseconds (u64).
    pub const BUDGET: u64 = 0x28;
    /// A `struct timespec` for `clock_gettime`.
    pub const NOW: u64 = 0x30;
    /// The `struct timespec` each wait sleeps (written by the tool).
    pub const NAP: u64 = 0x40;
    /// Scratch for the decimal digits of a number.
    pub const DIGITS: u64 = 0x50;
    /// The thread's own `struct sched_attr` (56 bytes) if the tool lent it
    /// a real-time priority for the program (its `size` field 0 if not):
    /// the program restores it on its way out.
    pub const SCHED: u64 = 0x80;
    /// One u64 per step: what `rax` held after it.
    pub const RESULTS: u64 = 0xc0;
    /// Steps that can have a result.
    pub const MAX_STEPS: u64 = 40;
    /// Free for the caller's strings and tables.
    pub const FREE: u64 = RESULTS + 8 * MAX_STEPS;
}

/// "hpprog01": a program's data block.
pub const MAGIC: u64 = 0x3130_676f_7270_7068;
/// [`data::GO`]: stop at this rendezvous and return.
pub const ABORT: u32 = u32::MAX;
/// [`data::GO`]: as if the deadline had passed (a later tool found the
/// program waiting for a tool that is gone).
pub const CANCEL: u32 = u32::MAX - 1;

/// An argument of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arg {
    Imm(u64),
    /// The result of an earlier step.
    Result(Step),
}

/// A step of a program (its index: where its result goes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Step(pub usize);

/// When a step's result means failure (the program then returns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Never fails.
    None,
    /// Fails if negative (a system call's `-errno`).
    NonNegative,
    /// Fails if zero (`dlopen`).
    NonZero,
    /// Fails unless equal (`mmap` at a fixed address).
    Equals(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Syscall {
        nr: u64,
        args: Vec<Arg>,
        check: Check,
    },
    Call {
        function: u64,
        args: Vec<Arg>,
        check: Check,
    },
    /// A rendezvous; giving up there (no tool to answer) first closes the
    /// descriptor a step returned, if any.
    Wait {
        phase: u32,
        close_on_give_up: Option<Step>,
    },
    /// Write the decimal digits of a step's result, then a NUL, at `at`.
    Digits {
        of: Step,
        at: u64,
    },
    /// `count` aligned 8-byte stores from (address, value) pairs at `table`.
    Stores {
        table: u64,
        count: u64,
    },
    /// `membarrier(PRIVATE_EXPEDITED_SYNC_CORE)`; if that is refused (the
    /// process never registered for it: `EPERM`) and `page` is not 0,
    /// `mprotect(page, R)` then `mprotect(page, RW)`: the TLB shootdown's
    /// IPIs serialise every core running the process.
    /// Result: 0 when the cores were serialised, else the failing `-errno`.
    SyncCores {
        page: u64,
    },
}

/// A program under construction.
#[derive(Debug, Clone, Default)]
pub struct Program {
    ops: Vec<Op>,
    phases: u32,
    /// Where a `struct sched_attr` to restore on the way out may be.
    restore_sched: Option<u64>,
}

/// What can go wrong assembling.
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    #[error("a program has at most {} steps", data::MAX_STEPS)]
    TooManySteps,
    #[error("a step has at most 6 arguments")]
    TooManyArguments,
    #[error("step {0} uses the result of a later step")]
    Forward(usize),
    #[error("assembling: {0}")]
    Asm(#[from] IcedError),
    #[error("the program is {0} bytes; {1} fit")]
    TooLong(usize, usize),
}

const NR_NANOSLEEP: u32 = 35;
const NR_CLOSE: u32 = 3;
const NR_MPROTECT: u32 = 10;
const NR_CLOCK_GETTIME: u32 = 228;
const NR_MEMBARRIER: u32 = 324;
const NR_SCHED_SETATTR: u32 = 314;
const CLOCK_MONOTONIC: u32 = 1;
const MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE: u32 = 32;
const PROT_READ: u32 = 1;
const PROT_WRITE: u32 = 2;

impl Program {
    pub fn new() -> Program {
        Program::default()
    }

    fn push(&mut self, op: Op) -> Step {
        self.ops.push(op);
        Step(self.ops.len() - 1)
    }

    /// Raw system call `nr(args)`.
    pub fn syscall(&mut self, nr: u64, args: &[Arg], check: Check) -> Step {
        self.push(Op::Syscall {
            nr,
            args: args.to_vec(),
            check,
        })
    }

    /// `function(args)` with the SysV ABI.
    pub fn call(&mut self, function: u64, args: &[Arg], check: Check) -> Step {
        self.push(Op::Call {
            function,
            args: args.to_vec(),
            check,
        })
    }

    /// A rendezvous: publish the next phase number and wait for the tool.
    /// Returns that number.
    pub fn wait(&mut self) -> u32 {
        self.phases += 1;
        let phase = self.phases;
        self.push(Op::Wait {
            phase,
            close_on_give_up: None,
        });
        phase
    }

    /// [`Program::wait`]; if it gives up there (the tool is gone), it
    /// closes the descriptor `fd` returned first (an abort leaves it to
    /// the tool, which is there to close it).
    pub fn wait_closing(&mut self, fd: Step) -> u32 {
        self.phases += 1;
        let phase = self.phases;
        self.push(Op::Wait {
            phase,
            close_on_give_up: Some(fd),
        });
        phase
    }

    pub fn digits(&mut self, of: Step, at: u64) -> Step {
        self.push(Op::Digits { of, at })
    }

    pub fn stores(&mut self, table: u64, count: u64) -> Step {
        self.push(Op::Stores { table, count })
    }

    pub fn sync_cores(&mut self, page: u64) -> Step {
        self.push(Op::SyncCores { page })
    }

    /// On every way out (after the last step, a failed check, an abort,
    /// a deadline): if the `struct sched_attr` at `at` has a non-zero size,
    /// `sched_setattr(0, at, 0)` — the thread gives back a priority the
    /// tool lent it for the program, with nobody's help.
    pub fn restore_scheduling(&mut self, at: u64) {
        self.restore_sched = Some(at);
    }

    /// Steps so far.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Machine code for a program at `at` whose data block is at `data`,
    /// at most `max` bytes. A function of the SysV ABI without arguments;
    /// it clobbers what a function may, and returns nothing.
    pub fn assemble(&self, at: u64, data_at: u64, max: usize) -> Result<Vec<u8>, ProgramError> {
        if self.ops.len() as u64 > data::MAX_STEPS {
            return Err(ProgramError::TooManySteps);
        }
        let d = |off: u64| qword_ptr(rbx + off as i32);
        let d32 = |off: u64| dword_ptr(rbx + off as i32);
        let result = |s: Step| d(data::RESULTS + 8 * s.0 as u64);
        let mut a = CodeAssembler::new(64)?;
        let mut end = a.create_label();
        let mut failed = a.create_label();
        // rsp ≡ 8 (mod 16) at entry; three pushes align it for calls.
        a.push(rbx)?;
        a.push(rbp)?;
        a.push(r12)?;
        a.mov(rbx, data_at)?;
        // Deadline = now + budget.
        a.mov(eax, NR_CLOCK_GETTIME)?;
        a.mov(edi, CLOCK_MONOTONIC)?;
        a.lea(rsi, d(data::NOW))?;
        a.syscall()?;
        now_ns(&mut a)?;
        a.add(rax, d(data::BUDGET))?;
        a.mov(d(data::DEADLINE), rax)?;
        for (i, op) in self.ops.iter().enumerate() {
            let load = |a: &mut CodeAssembler, r: AsmRegister64, arg: &Arg| -> Result<(), ProgramError> {
                match *arg {
                    Arg::Imm(v) => a.mov(r, v)?,
                    Arg::Result(s) if s.0 < i => a.mov(r, result(s))?,
                    Arg::Result(_) => return Err(ProgramError::Forward(i)),
                }
                Ok(())
            };
            // The failing step's number, in r12 for the shared exit.
            let check = |a: &mut CodeAssembler, c: Check, failed: CodeLabel| -> Result<(), ProgramError> {
                match c {
                    Check::None => return Ok(()),
                    Check::NonNegative => {
                        a.mov(r12d, i as u32 + 1)?;
                        a.test(rax, rax)?;
                        a.js(failed)?;
                    }
                    Check::NonZero => {
                        a.mov(r12d, i as u32 + 1)?;
                        a.test(rax, rax)?;
                        a.jz(failed)?;
                    }
                    Check::Equals(v) => {
                        a.mov(r12d, i as u32 + 1)?;
                        a.mov(rcx, v)?;
                        a.cmp(rax, rcx)?;
                        a.jne(failed)?;
                    }
                }
                Ok(())
            };
            match op {
                Op::Syscall { nr, args, check: c } => {
                    if args.len() > 6 {
                        return Err(ProgramError::TooManyArguments);
                    }
                    for (arg, r) in args.iter().zip([rdi, rsi, rdx, r10, r8, r9]) {
                        load(&mut a, r, arg)?;
                    }
                    a.mov(rax, *nr)?;
                    a.syscall()?;
                    a.mov(result(Step(i)), rax)?;
                    check(&mut a, *c, failed)?;
                }
                Op::Call {
                    function,
                    args,
                    check: c,
                } => {
                    if args.len() > 6 {
                        return Err(ProgramError::TooManyArguments);
                    }
                    for (arg, r) in args.iter().zip([rdi, rsi, rdx, rcx, r8, r9]) {
                        load(&mut a, r, arg)?;
                    }
                    a.mov(r11, *function)?;
                    a.xor(eax, eax)?; // no vector arguments (variadic callees)
                    a.call(r11)?;
                    a.mov(result(Step(i)), rax)?;
                    check(&mut a, *c, failed)?;
                }
                Op::Wait {
                    phase,
                    close_on_give_up,
                } => {
                    if close_on_give_up.is_some_and(|s| s.0 >= i) {
                        return Err(ProgramError::Forward(i));
                    }
                    let fd = close_on_give_up.map(|s| data::RESULTS + 8 * s.0 as u64);
                    wait(&mut a, *phase, fd, &mut end)?
                }
                Op::Digits { of, at } => {
                    load(&mut a, rax, &Arg::Result(*of))?;
                    // Backwards into DIGITS, then forwards to `at`.
                    a.lea(rsi, d(data::DIGITS + 24))?;
                    a.mov(ecx, 10)?;
                    let mut next = a.create_label();
                    a.set_label(&mut next)?;
                    a.xor(edx, edx)?;
                    a.div(rcx)?;
                    a.add(dl, b'0' as u32)?;
                    a.dec(rsi)?;
                    a.mov(byte_ptr(rsi), dl)?;
                    a.test(rax, rax)?;
                    a.jnz(next)?;
                    a.lea(rcx, d(data::DIGITS + 24))?;
                    a.sub(rcx, rsi)?;
                    a.mov(result(Step(i)), rcx)?;
                    a.mov(rdi, *at)?;
                    a.cld()?;
                    a.rep().movsb()?;
                    a.mov(byte_ptr(rdi), 0i32)?;
                }
                Op::Stores { table, count } => {
                    if *count > 0 {
                        a.mov(rsi, *table)?;
                        a.mov(rcx, *count)?;
                        let mut next = a.create_label();
                        a.set_label(&mut next)?;
                        a.mov(rax, qword_ptr(rsi))?;
                        a.mov(rdx, qword_ptr(rsi + 8))?;
                        a.mov(qword_ptr(rax), rdx)?;
                        a.add(rsi, 16)?;
                        a.dec(rcx)?;
                        a.jnz(next)?;
                    }
                    a.mov(result(Step(i)), *count as i32)?;
                }
                Op::SyncCores { page } => {
                    let mut done = a.create_label();
                    a.mov(eax, NR_MEMBARRIER)?;
                    a.mov(edi, MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)?;
                    a.xor(esi, esi)?;
                    a.xor(edx, edx)?;
                    a.syscall()?;
                    a.test(rax, rax)?;
                    a.jz(done)?;
                    if *page != 0 {
                        for prot in [PROT_READ, PROT_READ | PROT_WRITE] {
                            a.mov(eax, NR_MPROTECT)?;
                            a.mov(rdi, *page)?;
                            a.mov(esi, 4096u32)?;
                            a.mov(edx, prot)?;
                            a.syscall()?;
                            a.test(rax, rax)?;
                            a.jnz(done)?;
                        }
                    }
                    a.set_label(&mut done)?;
                    a.mov(result(Step(i)), rax)?;
                }
            }
        }
        a.jmp(end)?;
        a.set_label(&mut failed)?;
        a.mov(d32(data::FAILED), r12d)?;
        a.set_label(&mut end)?;
        // Done with the data block's results: the tool may go on. What
        // follows only gives back a lent priority (a thread that drops to
        // its own priority may wait for a CPU, and the tool need not wait
        // with it); the tool waits for the stub's done flag before it
        // touches the code page, the data block or the frame again.
        a.mov(d32(data::ENDED), 1u32)?;
        if let Some(at) = self.restore_sched {
            let mut kept = a.create_label();
            a.mov(rsi, at)?;
            a.cmp(dword_ptr(rsi), 0)?;
            a.je(kept)?;
            a.mov(eax, NR_SCHED_SETATTR)?;
            a.xor(edi, edi)?;
            a.xor(edx, edx)?;
            a.syscall()?;
            a.set_label(&mut kept)?;
        }
        a.pop(r12)?;
        a.pop(rbp)?;
        a.pop(rbx)?;
        a.ret()?;
        let code = a.assemble(at)?;
        if code.len() > max {
            return Err(ProgramError::TooLong(code.len(), max));
        }
        Ok(code)
    }
}

/// rax = NOW as nanoseconds.
fn now_ns(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(rax, qword_ptr(rbx + data::NOW as i32))?;
    a.imul_3(rax, rax, 1_000_000_000)?;
    a.add(rax, qword_ptr(rbx + (data::NOW + 8) as i32))
}

/// Publish `phase`, then sleep-poll `GO` until it says this phase (go on),
/// [`ABORT`] (return), [`CANCEL`] or the deadline (record `GAVE_UP`,
/// return).
fn wait(a: &mut CodeAssembler, phase: u32, close: Option<u64>, end: &mut CodeLabel) -> Result<(), IcedError> {
    let d32 = |off: u64| dword_ptr(rbx + off as i32);
    let mut poll = a.create_label();
    let mut go = a.create_label();
    let mut gave_up = a.create_label();
    a.mov(d32(data::PHASE), phase)?;
    a.set_label(&mut poll)?;
    a.mov(eax, d32(data::GO))?;
    a.cmp(eax, phase)?;
    a.je(go)?;
    a.cmp(eax, ABORT)?;
    a.je(*end)?;
    a.cmp(eax, CANCEL)?;
    a.je(gave_up)?;
    a.mov(eax, NR_NANOSLEEP)?;
    a.lea(rdi, qword_ptr(rbx + data::NAP as i32))?;
    a.xor(esi, esi)?;
    a.syscall()?;
    a.mov(eax, NR_CLOCK_GETTIME)?;
    a.mov(edi, CLOCK_MONOTONIC)?;
    a.lea(rsi, qword_ptr(rbx + data::NOW as i32))?;
    a.syscall()?;
    // No clock (a seccomp filter refused it): no deadline either, so it
    // gives up at once rather than wait without one.
    a.test(rax, rax)?;
    a.jnz(gave_up)?;
    now_ns(a)?;
    a.cmp(rax, qword_ptr(rbx + data::DEADLINE as i32))?;
    a.jb(poll)?;
    a.set_label(&mut gave_up)?;
    if let Some(fd_at) = close {
        let mut open = a.create_label();
        a.mov(rdi, qword_ptr(rbx + fd_at as i32))?;
        a.test(rdi, rdi)?;
        a.jns(open)?;
        a.jmp(*end)?;
        a.set_label(&mut open)?;
        a.mov(eax, NR_CLOSE)?;
        a.syscall()?;
    }
    a.mov(d32(data::GAVE_UP), phase)?;
    a.jmp(*end)?;
    a.set_label(&mut go)
}

/// How a program ended or where it waits, read from its data block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub phase: u32,
    /// The step whose check failed.
    pub failed: Option<Step>,
    /// The phase at which it stopped waiting unanswered.
    pub gave_up: Option<u32>,
    pub ended: bool,
}

impl Status {
    /// From the first [`data::RESULTS`] bytes of a data block.
    pub fn parse(block: &[u8]) -> Option<Status> {
        let u32_at = |off: u64| {
            let off = off as usize;
            block
                .get(off..off + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
        };
        let failed = u32_at(data::FAILED)?;
        let gave_up = u32_at(data::GAVE_UP)?;
        Some(Status {
            phase: u32_at(data::PHASE)?,
            failed: failed.checked_sub(1).map(|i| Step(i as usize)),
            gave_up: (gave_up != 0).then_some(gave_up),
            ended: u32_at(data::ENDED)? == 1,
        })
    }
}

/// The data block's header as the tool writes it before the program
/// starts: magic, budget and nap; everything the program writes zeroed.
pub fn header(budget_ns: u64, nap_ns: u64) -> Vec<u8> {
    let mut h = vec![0u8; data::FREE as usize];
    let mut put = |off: u64, v: u64| h[off as usize..off as usize + 8].copy_from_slice(&v.to_le_bytes());
    put(data::MAGIC, MAGIC);
    put(data::BUDGET, budget_ns);
    put(data::NAP + 8, nap_ns);
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::format_instruction;

    fn text(code: &[u8], ip: u64) -> Vec<String> {
        let mut d = iced_x86::Decoder::with_ip(64, code, ip, 0);
        (&mut d).into_iter().map(|i| format_instruction(&i)).collect()
    }

    #[test]
    fn a_program_decodes_and_ends_in_one_ret() {
        let mut p = Program::new();
        let fd = p.syscall(319, &[Arg::Imm(0x1000), Arg::Imm(3)], Check::NonNegative);
        let phase = p.wait();
        assert_eq!(phase, 1);
        p.digits(fd, 0x2000);
        let h = p.call(0x7f00_0000_1000, &[Arg::Imm(0x2000), Arg::Imm(2)], Check::NonZero);
        p.syscall(3, &[Arg::Result(fd)], Check::None);
        assert_eq!(p.wait(), 2);
        p.stores(0x3000, 2);
        p.sync_cores(0x4000);
        assert_eq!(h, Step(3));
        let code = p.assemble(0x10_0000, 0x20_0000, 3072).unwrap();
        let lines = text(&code, 0x10_0000);
        assert!(
            !lines.iter().any(|l| l.contains("(bad)") || l.starts_with("int")),
            "{lines:#?}"
        );
        assert_eq!(lines.iter().filter(|l| *l == "ret").count(), 1, "{lines:#?}");
        assert_eq!(lines.last().map(String::as_str), Some("ret"));
        // clock, memfd, 2 waits (nap, clock), close, membarrier, 2 mprotects.
        assert_eq!(
            lines.iter().filter(|l| *l == "syscall").count(),
            1 + 1 + 2 * 2 + 1 + 3
        );
    }

    #[test]
    fn forward_references_and_oversize_are_refused() {
        let mut p = Program::new();
        p.syscall(39, &[Arg::Result(Step(0))], Check::None);
        assert!(matches!(p.assemble(0, 0, 4096), Err(ProgramError::Forward(0))));
        let mut p = Program::new();
        for _ in 0..=data::MAX_STEPS {
            p.syscall(39, &[], Check::None);
        }
        assert!(matches!(
            p.assemble(0, 0, 1 << 20),
            Err(ProgramError::TooManySteps)
        ));
        let mut p = Program::new();
        p.syscall(39, &[], Check::None);
        assert!(matches!(p.assemble(0, 0, 8), Err(ProgramError::TooLong(..))));
    }

    #[test]
    fn status_reads_the_header() {
        let mut block = header(5, 6);
        assert_eq!(
            Status::parse(&block),
            Some(Status {
                phase: 0,
                failed: None,
                gave_up: None,
                ended: false
            })
        );
        block[data::PHASE as usize] = 2;
        block[data::FAILED as usize] = 4;
        block[data::GAVE_UP as usize] = 2;
        block[data::ENDED as usize] = 1;
        let s = Status::parse(&block).unwrap();
        assert_eq!(
            (s.phase, s.failed, s.gave_up, s.ended),
            (2, Some(Step(3)), Some(2), true)
        );
        assert_eq!(Status::parse(&block[..8]), None);
    }
}
