//! Seccomp filters (pure): decode a classic-BPF program as
//! `PTRACE_SECCOMP_GET_FILTER` returns it, and work out every answer it can
//! give for a system call whose number and architecture are known and whose
//! instruction pointer and arguments may be known or not.
//!
//! The interpreter runs the program over `struct seccomp_data` (`nr`,
//! `arch`, `instruction_pointer`, `args[6]`) with abstract values: a word
//! is either known or unknown. A conditional jump on an unknown value
//! takes both ways, so the result is the set of every return value some
//! value of the unknown fields can produce — a superset of what the kernel
//! will answer, never a subset. States already explored are not explored
//! again (classic BPF only jumps forward, so the work is bounded by the
//! distinct states, not the paths).
//!
//! Several filters on one thread combine as the kernel combines them: each
//! runs, and the answer of highest precedence (lowest signed action value:
//! `KILL_PROCESS` first, `ALLOW` last) wins.

use std::collections::{BTreeSet, HashSet};

/// `AUDIT_ARCH_X86_64`: what `seccomp_data.arch` holds for a 64-bit
/// system call on x86-64.
pub const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

/// `BPF_MAXINSNS`: the kernel refuses longer programs.
pub const MAX_INSNS: usize = 4096;

/// Bytes of `struct seccomp_data`.
const DATA_LEN: u32 = 64;

/// Work bound for one evaluation (instructions executed over all explored
/// states); beyond it the filter is "too complex" and treated as unknown.
const MAX_STEPS: usize = 1 << 20;

/// One classic-BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

impl Insn {
    pub const fn new(code: u16, jt: u8, jf: u8, k: u32) -> Insn {
        Insn { code, jt, jf, k }
    }
}

/// Classic-BPF opcode parts, as `linux/bpf_common.h` and
/// `linux/filter.h` define them.
pub mod op {
    pub const LD: u16 = 0x00;
    pub const LDX: u16 = 0x01;
    pub const ST: u16 = 0x02;
    pub const STX: u16 = 0x03;
    pub const ALU: u16 = 0x04;
    pub const JMP: u16 = 0x05;
    pub const RET: u16 = 0x06;
    pub const MISC: u16 = 0x07;
    pub const W: u16 = 0x00;
    pub const H: u16 = 0x08;
    pub const B: u16 = 0x10;
    pub const IMM: u16 = 0x00;
    pub const ABS: u16 = 0x20;
    pub const IND: u16 = 0x40;
    pub const MEM: u16 = 0x60;
    pub const LEN: u16 = 0x80;
    pub const MSH: u16 = 0xa0;
    pub const ADD: u16 = 0x00;
    pub const SUB: u16 = 0x10;
    pub const MUL: u16 = 0x20;
    pub const DIV: u16 = 0x30;
    pub const OR: u16 = 0x40;
    pub const AND: u16 = 0x50;
    pub const LSH: u16 = 0x60;
    pub const RSH: u16 = 0x70;
    pub const NEG: u16 = 0x80;
    pub const MOD: u16 = 0x90;
    pub const XOR: u16 = 0xa0;
    pub const JA: u16 = 0x00;
    pub const JEQ: u16 = 0x10;
    pub const JGT: u16 = 0x20;
    pub const JGE: u16 = 0x30;
    pub const JSET: u16 = 0x40;
    pub const K: u16 = 0x00;
    pub const X: u16 = 0x08;
    /// `BPF_RET | BPF_A`.
    pub const RET_A: u16 = 0x10;
    pub const TAX: u16 = 0x00;
    pub const TXA: u16 = 0x80;
}

/// Return values (`SECCOMP_RET_*`).
pub mod ret {
    pub const KILL_PROCESS: u32 = 0x8000_0000;
    pub const KILL_THREAD: u32 = 0x0000_0000;
    pub const TRAP: u32 = 0x0003_0000;
    pub const ERRNO: u32 = 0x0005_0000;
    pub const USER_NOTIF: u32 = 0x7fc0_0000;
    pub const TRACE: u32 = 0x7ff0_0000;
    pub const LOG: u32 = 0x7ffc_0000;
    pub const ALLOW: u32 = 0x7fff_0000;
    pub const ACTION_FULL: u32 = 0xffff_0000;
    pub const DATA: u32 = 0x0000_ffff;
}

/// A filter program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    insns: Vec<Insn>,
}

/// Why a program could not be read or evaluated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("{0} bytes is not a whole number of 8-byte BPF instructions")]
    Length(usize),
    #[error("an empty or longer than {MAX_INSNS}-instruction program")]
    Size,
    #[error("instruction {at}: {what}")]
    Malformed { at: usize, what: String },
    #[error("too complex to evaluate (more than {MAX_STEPS} steps)")]
    TooComplex,
}

impl Program {
    pub fn new(insns: Vec<Insn>) -> Result<Program, FilterError> {
        if insns.is_empty() || insns.len() > MAX_INSNS {
            return Err(FilterError::Size);
        }
        Ok(Program { insns })
    }

    /// The program from the bytes of a `struct sock_filter` array (native,
    /// little-endian: u16 code, u8 jt, u8 jf, u32 k).
    pub fn parse(bytes: &[u8]) -> Result<Program, FilterError> {
        if !bytes.len().is_multiple_of(8) {
            return Err(FilterError::Length(bytes.len()));
        }
        let insns = bytes
            .chunks_exact(8)
            .map(|c| Insn {
                code: u16::from_le_bytes([c[0], c[1]]),
                jt: c[2],
                jf: c[3],
                k: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect();
        Program::new(insns)
    }

    pub fn insns(&self) -> &[Insn] {
        &self.insns
    }
}

/// One system call as a filter sees it; `None` fields are unknown (any
/// value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    pub nr: u32,
    pub arch: u32,
    pub ip: Option<u64>,
    pub args: [Option<u64>; 6],
}

impl Query {
    /// An x86-64 system call with unknown instruction pointer.
    pub fn x86_64(nr: u32, args: [Option<u64>; 6]) -> Query {
        Query {
            nr,
            arch: AUDIT_ARCH_X86_64,
            ip: None,
            args,
        }
    }

    /// The 32-bit word at `offset` of `seccomp_data`, if known.
    fn word(&self, offset: u32) -> Option<u32> {
        let half = |v: Option<u64>, high: bool| v.map(|v| if high { (v >> 32) as u32 } else { v as u32 });
        match offset {
            0 => Some(self.nr),
            4 => Some(self.arch),
            8 | 12 => half(self.ip, offset == 12),
            16..=63 => {
                let i = ((offset - 16) / 8) as usize;
                half(self.args[i], !(offset - 16).is_multiple_of(8))
            }
            _ => None,
        }
    }
}

/// What a filter answers: a `SECCOMP_RET_*` value, or unknown (a return of
/// an unknown accumulator).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    Unknown,
    Ret(u32),
}

impl Outcome {
    /// The kernel's precedence: lower wins (`ACTION_ONLY` as a signed
    /// value). Unknown counts as the strongest.
    pub fn precedence(self) -> i64 {
        match self {
            Outcome::Unknown => i64::MIN,
            Outcome::Ret(v) => i64::from((v & ret::ACTION_FULL) as i32),
        }
    }

    /// The system call runs (`ALLOW` or `LOG`).
    pub fn allows(self) -> bool {
        matches!(self, Outcome::Ret(v) if matches!(v & ret::ACTION_FULL, ret::ALLOW | ret::LOG))
    }

    /// The system call fails with an error and nothing else happens:
    /// `ERRNO`, or `TRACE` with no tracer (`ENOSYS`; the thread running a
    /// remote call is never traced).
    pub fn fails_cleanly(self) -> bool {
        matches!(self, Outcome::Ret(v) if matches!(v & ret::ACTION_FULL, ret::ERRNO | ret::TRACE))
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Outcome::Ret(v) = *self else {
            return f.write_str("an unknown action");
        };
        let data = v & ret::DATA;
        match v & ret::ACTION_FULL {
            ret::KILL_PROCESS => f.write_str("KILL_PROCESS"),
            ret::KILL_THREAD => f.write_str("KILL_THREAD"),
            ret::TRAP => write!(f, "TRAP (SIGSYS)"),
            ret::ERRNO => {
                let text = std::io::Error::from_raw_os_error(data as i32).to_string();
                let text = text.split(" (os error").next().unwrap_or(&text);
                write!(f, "ERRNO({data}: {text})")
            }
            ret::USER_NOTIF => f.write_str("USER_NOTIF"),
            ret::TRACE => f.write_str("TRACE (ENOSYS without a tracer)"),
            ret::LOG => f.write_str("LOG"),
            ret::ALLOW => f.write_str("ALLOW"),
            // The kernel treats any other action as KILL_PROCESS.
            other => write!(f, "action {other:#x} (KILL_PROCESS)"),
        }
    }
}

/// An abstract 32-bit value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum V {
    K(u32),
    U,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct State {
    pc: usize,
    a: V,
    x: V,
    mem: [V; 16],
}

/// Every answer `program` can give for `query`.
pub fn outcomes(program: &Program, query: &Query) -> Result<BTreeSet<Outcome>, FilterError> {
    let insns = &program.insns;
    let mut out = BTreeSet::new();
    let mut seen: HashSet<State> = HashSet::new();
    let mut todo = vec![State {
        pc: 0,
        a: V::K(0),
        x: V::K(0),
        mem: [V::U; 16],
    }];
    let mut steps = 0usize;
    let bad = |at: usize, what: &str| FilterError::Malformed {
        at,
        what: what.to_string(),
    };
    while let Some(mut s) = todo.pop() {
        loop {
            steps += 1;
            if steps > MAX_STEPS {
                return Err(FilterError::TooComplex);
            }
            let at = s.pc;
            let Some(&i) = insns.get(at) else {
                return Err(bad(at, "runs off the end of the program"));
            };
            let class = i.code & 0x07;
            let next = at + 1;
            match class {
                op::LD | op::LDX => {
                    let v = match (i.code & 0xe0, i.code & 0x18) {
                        (op::IMM, _) => V::K(i.k),
                        (op::ABS, op::W) if class == op::LD => {
                            if i.k % 4 != 0 || i.k >= DATA_LEN {
                                return Err(bad(at, "load outside seccomp_data"));
                            }
                            query.word(i.k).map_or(V::U, V::K)
                        }
                        (op::MEM, _) => *s.mem.get(i.k as usize).ok_or_else(|| bad(at, "memory index"))?,
                        (op::LEN, _) => V::K(DATA_LEN),
                        _ => return Err(bad(at, &format!("load {:#x} not allowed in seccomp", i.code))),
                    };
                    if class == op::LD {
                        s.a = v;
                    } else {
                        s.x = v;
                    }
                    s.pc = next;
                }
                op::ST | op::STX => {
                    let v = if class == op::ST { s.a } else { s.x };
                    *s.mem
                        .get_mut(i.k as usize)
                        .ok_or_else(|| bad(at, "memory index"))? = v;
                    s.pc = next;
                }
                op::ALU => {
                    let operand = if i.code & op::X != 0 { s.x } else { V::K(i.k) };
                    s.a = match alu(i.code & 0xf0, s.a, operand) {
                        Ok(v) => v,
                        Err(AluError::DivideByZero) => {
                            // Classic BPF ends the program with 0: KILL_THREAD.
                            out.insert(Outcome::Ret(0));
                            break;
                        }
                        Err(AluError::Bad) => return Err(bad(at, &format!("ALU op {:#x}", i.code))),
                    };
                    s.pc = next;
                }
                op::JMP => {
                    let jop = i.code & 0xf0;
                    if jop == op::JA {
                        s.pc = next
                            .checked_add(i.k as usize)
                            .filter(|&p| p < insns.len())
                            .ok_or_else(|| bad(at, "jump out of the program"))?;
                        continue;
                    }
                    let (t, f) = (next + i.jt as usize, next + i.jf as usize);
                    if t >= insns.len() || f >= insns.len() {
                        return Err(bad(at, "jump out of the program"));
                    }
                    let operand = if i.code & op::X != 0 { s.x } else { V::K(i.k) };
                    let taken = match (s.a, operand) {
                        (V::K(a), V::K(b)) => Some(match jop {
                            op::JEQ => a == b,
                            op::JGT => a > b,
                            op::JGE => a >= b,
                            op::JSET => a & b != 0,
                            _ => return Err(bad(at, &format!("jump op {:#x}", i.code))),
                        }),
                        (_, V::K(0)) if jop == op::JSET => Some(false),
                        (_, V::K(0)) if jop == op::JGE => Some(true),
                        _ => None,
                    };
                    match taken {
                        Some(true) => s.pc = t,
                        Some(false) => s.pc = f,
                        None => {
                            if !matches!(jop, op::JEQ | op::JGT | op::JGE | op::JSET) {
                                return Err(bad(at, &format!("jump op {:#x}", i.code)));
                            }
                            let mut other = s.clone();
                            other.pc = f;
                            if seen.insert(other.clone()) {
                                todo.push(other);
                            }
                            s.pc = t;
                        }
                    }
                    if !seen.insert(s.clone()) {
                        break;
                    }
                }
                op::RET => {
                    let v = match i.code & 0x18 {
                        op::K => V::K(i.k),
                        op::RET_A => s.a,
                        _ => return Err(bad(at, &format!("return {:#x}", i.code))),
                    };
                    out.insert(match v {
                        V::K(v) => Outcome::Ret(v),
                        V::U => Outcome::Unknown,
                    });
                    break;
                }
                _ => {
                    match i.code & 0xf8 {
                        op::TAX => s.x = s.a,
                        op::TXA => s.a = s.x,
                        _ => return Err(bad(at, &format!("misc op {:#x}", i.code))),
                    }
                    s.pc = next;
                }
            }
        }
    }
    Ok(out)
}

enum AluError {
    DivideByZero,
    Bad,
}

fn alu(code: u16, a: V, b: V) -> Result<V, AluError> {
    if code == op::NEG {
        return Ok(match a {
            V::K(a) => V::K(a.wrapping_neg()),
            V::U => V::U,
        });
    }
    let (a, b) = match (a, b) {
        (V::K(a), V::K(b)) => (a, b),
        // Results that do not depend on the unknown side.
        (_, V::K(0)) if code == op::AND || code == op::MUL => return Ok(V::K(0)),
        (_, V::K(0)) if matches!(code, op::DIV | op::MOD) => return Err(AluError::DivideByZero),
        (V::K(0), _) if code == op::AND || code == op::MUL => return Ok(V::K(0)),
        (_, V::K(b)) if code == op::OR && b == u32::MAX => return Ok(V::K(u32::MAX)),
        (_, V::K(b)) if matches!(code, op::LSH | op::RSH) && b >= 32 => return Ok(V::K(0)),
        _ if matches!(
            code,
            op::ADD | op::SUB | op::MUL | op::DIV | op::OR | op::AND | op::LSH | op::RSH | op::MOD | op::XOR
        ) =>
        {
            return Ok(V::U);
        }
        _ => return Err(AluError::Bad),
    };
    Ok(V::K(match code {
        op::ADD => a.wrapping_add(b),
        op::SUB => a.wrapping_sub(b),
        op::MUL => a.wrapping_mul(b),
        op::DIV => a.checked_div(b).ok_or(AluError::DivideByZero)?,
        op::MOD => a.checked_rem(b).ok_or(AluError::DivideByZero)?,
        op::OR => a | b,
        op::AND => a & b,
        op::XOR => a ^ b,
        // Shifts by 32 or more give 0 (the kernel's classic BPF does).
        op::LSH => a.checked_shl(b).unwrap_or(0),
        op::RSH => a.checked_shr(b).unwrap_or(0),
        _ => return Err(AluError::Bad),
    }))
}

/// The strongest answer the filters of one thread (all of them run; the
/// answer of highest precedence wins) can give for `query`; `None` without
/// filters.
pub fn strongest(filters: &[Program], query: &Query) -> Result<Option<Outcome>, FilterError> {
    let mut worst: Option<Outcome> = None;
    for p in filters {
        for o in outcomes(p, query)? {
            if worst.is_none_or(|w| o.precedence() < w.precedence()) {
                worst = Some(o);
            }
        }
    }
    Ok(worst)
}

#[cfg(test)]
mod tests {
    use super::op::*;
    use super::*;
    use proptest::prelude::*;

    const NR_MMAP: u32 = 9;
    const NR_MPROTECT: u32 = 10;
    const PROT_WRITE: u64 = 2;
    const PROT_EXEC: u64 = 4;

    fn stmt(code: u16, k: u32) -> Insn {
        Insn::new(code, 0, 0, k)
    }
    fn jump(code: u16, k: u32, jt: u8, jf: u8) -> Insn {
        Insn::new(code, jt, jf, k)
    }
    const LD_W_ABS: u16 = LD | W | ABS;
    const JEQ_K: u16 = JMP | JEQ | K;
    const JSET_K: u16 = JMP | JSET | K;
    const RET_K: u16 = RET | K;

    /// arch check, then `nr == kill_nr → action`, else allow.
    fn kill_one(nr: u32, action: u32) -> Program {
        Program::new(vec![
            stmt(LD_W_ABS, 4),
            jump(JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
            stmt(RET_K, ret::KILL_PROCESS),
            stmt(LD_W_ABS, 0),
            jump(JEQ_K, nr, 0, 1),
            stmt(RET_K, action),
            stmt(RET_K, ret::ALLOW),
        ])
        .unwrap()
    }

    /// systemd's MemoryDenyWriteExecute, roughly: mprotect with PROT_EXEC
    /// and mmap with PROT_WRITE|PROT_EXEC fail with EPERM.
    fn deny_wx() -> Program {
        Program::new(vec![
            stmt(LD_W_ABS, 0),
            jump(JEQ_K, NR_MPROTECT, 0, 3),
            stmt(LD_W_ABS, 16 + 2 * 8), // args[2] low word
            jump(JSET_K, PROT_EXEC as u32, 5, 6),
            stmt(RET_K, ret::ALLOW),
            jump(JEQ_K, NR_MMAP, 0, 4),
            stmt(LD_W_ABS, 16 + 2 * 8),
            stmt(ALU | AND | K, (PROT_WRITE | PROT_EXEC) as u32),
            jump(JEQ_K, (PROT_WRITE | PROT_EXEC) as u32, 0, 1),
            stmt(RET_K, ret::ERRNO | 1),
            stmt(RET_K, ret::ALLOW),
        ])
        .unwrap()
    }

    fn q(nr: u32, args: [Option<u64>; 6]) -> Query {
        Query::x86_64(nr, args)
    }

    fn only(p: &Program, query: &Query) -> Outcome {
        let o = outcomes(p, query).unwrap();
        assert_eq!(o.len(), 1, "{o:?}");
        *o.iter().next().unwrap()
    }

    #[test]
    fn kills_exactly_the_named_call() {
        let p = kill_one(NR_MPROTECT, ret::KILL_PROCESS);
        assert_eq!(
            only(&p, &q(NR_MPROTECT, [None; 6])),
            Outcome::Ret(ret::KILL_PROCESS)
        );
        assert_eq!(only(&p, &q(NR_MMAP, [None; 6])), Outcome::Ret(ret::ALLOW));
        let mut other_arch = q(NR_MMAP, [None; 6]);
        other_arch.arch = 0x4000_0003; // i386
        assert_eq!(only(&p, &other_arch), Outcome::Ret(ret::KILL_PROCESS));
    }

    #[test]
    fn known_arguments_decide_and_unknown_ones_give_every_answer() {
        let p = deny_wx();
        let rx = Some(1 | PROT_EXEC);
        let mprotect = |prot| q(NR_MPROTECT, [None, None, prot, None, None, None]);
        assert_eq!(only(&p, &mprotect(rx)), Outcome::Ret(ret::ERRNO | 1));
        assert_eq!(only(&p, &mprotect(Some(1))), Outcome::Ret(ret::ALLOW));
        let both: BTreeSet<_> = [Outcome::Ret(ret::ERRNO | 1), Outcome::Ret(ret::ALLOW)].into();
        assert_eq!(outcomes(&p, &mprotect(None)).unwrap(), both);
        let mmap = |prot| q(NR_MMAP, [None, None, Some(prot), None, None, None]);
        assert_eq!(only(&p, &mmap(1 | PROT_EXEC)), Outcome::Ret(ret::ALLOW));
        assert_eq!(only(&p, &mmap(3 | PROT_EXEC)), Outcome::Ret(ret::ERRNO | 1));
        // The high word of the argument is not looked at.
        assert_eq!(only(&p, &mmap((1 << 40) | 3)), Outcome::Ret(ret::ALLOW));
    }

    #[test]
    fn the_strongest_answer_of_several_filters_wins() {
        let errno = kill_one(NR_MMAP, ret::ERRNO | 13);
        let trap = kill_one(NR_MMAP, ret::TRAP);
        let allow = Program::new(vec![stmt(RET_K, ret::ALLOW)]).unwrap();
        let mmap = q(NR_MMAP, [None; 6]);
        assert_eq!(strongest(&[], &mmap).unwrap(), None);
        assert_eq!(
            strongest(std::slice::from_ref(&allow), &mmap).unwrap(),
            Some(Outcome::Ret(ret::ALLOW))
        );
        assert_eq!(
            strongest(&[allow.clone(), errno.clone()], &mmap).unwrap(),
            Some(Outcome::Ret(ret::ERRNO | 13))
        );
        assert_eq!(
            strongest(&[errno, trap, allow], &mmap).unwrap(),
            Some(Outcome::Ret(ret::TRAP))
        );
        let log = Program::new(vec![stmt(RET_K, ret::LOG)]).unwrap();
        let kill_thread = Program::new(vec![stmt(RET_K, ret::KILL_THREAD)]).unwrap();
        assert_eq!(
            strongest(&[log, kill_thread], &mmap).unwrap(),
            Some(Outcome::Ret(ret::KILL_THREAD))
        );
    }

    #[test]
    fn classifies_actions() {
        for (v, allows, clean) in [
            (ret::ALLOW, true, false),
            (ret::LOG, true, false),
            (ret::ERRNO | 1, false, true),
            (ret::TRACE | 7, false, true),
            (ret::TRAP, false, false),
            (ret::USER_NOTIF, false, false),
            (ret::KILL_THREAD, false, false),
            (ret::KILL_PROCESS, false, false),
            (0x1234_0000, false, false),
        ] {
            assert_eq!(Outcome::Ret(v).allows(), allows, "{v:#x}");
            assert_eq!(Outcome::Ret(v).fails_cleanly(), clean, "{v:#x}");
        }
        assert!(!Outcome::Unknown.allows() && !Outcome::Unknown.fails_cleanly());
        assert_eq!(
            Outcome::Ret(ret::ERRNO | 1).to_string(),
            "ERRNO(1: Operation not permitted)"
        );
        assert_eq!(Outcome::Ret(ret::KILL_PROCESS).to_string(), "KILL_PROCESS");
    }

    #[test]
    fn memory_alu_and_return_of_a() {
        // A = nr; M[3] = A; A = 0; X = M[3]; A = X + 1; ret A  →  nr + 1.
        let p = Program::new(vec![
            stmt(LD_W_ABS, 0),
            stmt(ST, 3),
            stmt(LD | IMM, 0),
            stmt(LDX | MEM, 3),
            stmt(MISC | TXA, 0),
            stmt(ALU | ADD | K, 1),
            stmt(RET | RET_A, 0),
        ])
        .unwrap();
        assert_eq!(only(&p, &q(41, [None; 6])), Outcome::Ret(42));
        // Returning an unknown argument: unknown.
        let p = Program::new(vec![stmt(LD_W_ABS, 16), stmt(RET | RET_A, 0)]).unwrap();
        assert_eq!(only(&p, &q(0, [None; 6])), Outcome::Unknown);
        assert_eq!(
            only(&p, &q(0, [Some(ret::ALLOW as u64), None, None, None, None, None])),
            Outcome::Ret(ret::ALLOW)
        );
        // Division by an X of zero ends the program with 0 (KILL_THREAD).
        let p = Program::new(vec![
            stmt(LD | IMM, 5),
            stmt(ALU | DIV | X, 0),
            stmt(RET_K, ret::ALLOW),
        ])
        .unwrap();
        assert_eq!(only(&p, &q(0, [None; 6])), Outcome::Ret(ret::KILL_THREAD));
    }

    #[test]
    fn refuses_malformed_programs() {
        assert_eq!(Program::parse(&[0; 7]), Err(FilterError::Length(7)));
        assert_eq!(Program::parse(&[]), Err(FilterError::Size));
        let off_end = Program::new(vec![stmt(LD | IMM, 0)]).unwrap();
        assert!(matches!(
            outcomes(&off_end, &q(0, [None; 6])),
            Err(FilterError::Malformed { .. })
        ));
        let far = Program::new(vec![jump(JMP | JA, 100, 0, 0), stmt(RET_K, 0)]).unwrap();
        assert!(matches!(
            outcomes(&far, &q(0, [None; 6])),
            Err(FilterError::Malformed { .. })
        ));
        let outside = Program::new(vec![stmt(LD_W_ABS, 64), stmt(RET_K, 0)]).unwrap();
        assert!(matches!(
            outcomes(&outside, &q(0, [None; 6])),
            Err(FilterError::Malformed { .. })
        ));
    }

    #[test]
    fn parses_sock_filter_bytes() {
        let bytes = [
            0x20, 0x00, 0x01, 0x02, 0x04, 0x00, 0x00, 0x00, 0x06, 0, 0, 0, 0, 0, 0xff, 0x7f,
        ];
        let p = Program::parse(&bytes).unwrap();
        assert_eq!(
            p.insns(),
            &[Insn::new(0x20, 1, 2, 4), Insn::new(0x06, 0, 0, ret::ALLOW)]
        );
    }

    #[test]
    fn many_independent_unknown_checks_stay_cheap() {
        // 2^200 paths, few distinct states: each check on an unknown
        // argument, then a jump to the next check either way.
        let mut insns = Vec::new();
        for _ in 0..200 {
            insns.push(stmt(LD_W_ABS, 16));
            insns.push(jump(JEQ_K, 7, 0, 0));
        }
        insns.push(stmt(RET_K, ret::ALLOW));
        let p = Program::new(insns).unwrap();
        assert_eq!(only(&p, &q(0, [None; 6])), Outcome::Ret(ret::ALLOW));
    }

    /// A concrete interpreter, for the property below.
    fn run_concrete(p: &Program, data: &[u32; 16]) -> Option<u32> {
        let (mut a, mut x, mut mem, mut pc) = (0u32, 0u32, [0u32; 16], 0usize);
        loop {
            let i = *p.insns().get(pc)?;
            pc += 1;
            match i.code & 7 {
                LD => {
                    a = if i.code & 0xe0 == ABS {
                        data[(i.k / 4) as usize]
                    } else {
                        i.k
                    }
                }
                ST => mem[i.k as usize] = a,
                LDX => x = mem[i.k as usize],
                ALU => {
                    let b = if i.code & X != 0 { x } else { i.k };
                    a = match i.code & 0xf0 {
                        AND => a & b,
                        OR => a | b,
                        ADD => a.wrapping_add(b),
                        _ => a ^ b,
                    }
                }
                JMP => {
                    let t = match i.code & 0xf0 {
                        JEQ => a == i.k,
                        JGT => a > i.k,
                        JGE => a >= i.k,
                        _ => a & i.k != 0,
                    };
                    pc += if t { i.jt } else { i.jf } as usize;
                }
                RET => return Some(if i.code & 0x18 == RET_A { a } else { i.k }),
                _ => x = a,
            }
        }
    }

    fn arb_program() -> impl Strategy<Value = Vec<Insn>> {
        let insn = (0u8..9, 0u32..16, any::<u32>(), 0u8..4, 0u8..4).prop_map(|(kind, slot, k, jt, jf)| {
            let small = [0u32, 1, 7, ret::ALLOW, ret::ERRNO | 1, ret::KILL_PROCESS][(k % 6) as usize];
            match kind {
                0 => stmt(LD_W_ABS, slot * 4),
                1 => stmt(ST, slot),
                2 => stmt(LDX | MEM, slot),
                3 => stmt(ALU | [AND, OR, ADD, XOR][(k % 4) as usize] | K, small),
                4 => stmt(ALU | XOR | X, 0),
                5 => jump(JMP | [JEQ, JGT, JGE, JSET][(k % 4) as usize] | K, small, jt, jf),
                6 => stmt(MISC | TAX, 0),
                7 => stmt(RET | RET_A, 0),
                _ => stmt(RET_K, small),
            }
        });
        proptest::collection::vec(insn, 1..24).prop_map(|mut v| {
            v.push(stmt(RET_K, ret::ALLOW));
            v.push(stmt(RET_K, ret::ALLOW));
            v.push(stmt(RET_K, ret::ALLOW));
            v.push(stmt(RET_K, ret::ALLOW));
            v
        })
    }

    proptest! {
        /// Whatever the unknown fields hold, the concrete answer is among
        /// the abstract ones (soundness), and with every field known there
        /// is exactly that one answer.
        #[test]
        fn abstract_answers_cover_every_concrete_run(
            insns in arb_program(),
            data in proptest::array::uniform16(any::<u32>()),
            known in any::<u16>(),
        ) {
            // Memory must be written before it is read (the kernel's checker
            // refuses programs that do not): prefix stores of every slot.
            let mut all: Vec<Insn> = (0..16).map(|i| stmt(ST, i)).collect();
            all.extend(insns);
            let p = Program::new(all).unwrap();
            let Some(concrete) = run_concrete(&p, &data) else { return Ok(()) };
            let word = |i: usize| u64::from(data[i]);
            let field = |lo: usize| {
                let both = known & (0b11 << lo) == (0b11 << lo);
                both.then(|| word(lo) | (word(lo + 1) << 32))
            };
            let query = Query {
                nr: data[0],
                arch: data[1],
                ip: field(2),
                args: [field(4), field(6), field(8), field(10), field(12), field(14)],
            };
            let abs = outcomes(&p, &query).unwrap();
            let covered = abs.contains(&Outcome::Ret(concrete)) || abs.contains(&Outcome::Unknown);
            prop_assert!(covered, "concrete {concrete:#x} not in {abs:?}");
            if known == u16::MAX {
                prop_assert_eq!(abs.len(), 1);
            }
        }
    }
}
