//! The stop-the-world write a detour needs: never while a thread could
//! resume inside the overwritten bytes (its rip, or a return address or
//! signal context on its stack).

use hotpatch::engine::stopped::{Overwrite, write_stopped};
use hotpatch::plan::Write;
use hotpatch::process::{Mem, Process};
use hotpatch_testkit::build::build_sources;
use hotpatch_testkit::proc::Proc;
use std::process::Command;
use std::time::{Duration, Instant};

const TARGET: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
#include <stdint.h>
#include <sys/mman.h>

/* spin: 5 nops then jump back: a thread runs through the nops forever. */
extern char spin[], spin_end[];
__asm__(".text\n.globl spin\n.globl spin_end\nspin:\n nop\n nop\n nop\n nop\n nop\n nop\n jmp spin\nspin_end:\n");

/* holder: `call *%rax` (2 bytes) whose return address stays on the stack
 * while the callee blocks in read() on a pipe. */
extern void holder(void (*)(void));
__asm__(".text\n.globl holder\nholder:\n push %rbx\n mov %rdi, %rax\n call *%rax\nholder_ret:\n nop\n nop\n nop\n pop %rbx\n ret\n");

static int fds[2];
static volatile uint64_t laps;

static void block(void) { char c; read(fds[0], &c, 1); }

static void *spinner(void *a) { (void)a; ((void (*)(void))spin)(); return 0; }
static void *blocker(void *a) { (void)a; holder(block); return 0; }

int main(void) {
    pipe(fds);
    pthread_t t;
    pthread_create(&t, 0, spinner, 0);
    pthread_create(&t, 0, blocker, 0);
    usleep(20000);
    printf("%lx %lx\n", (unsigned long)spin, (unsigned long)holder);
    fflush(stdout);
    char line[16];
    while (fgets(line, sizeof line, stdin)) {
        if (line[0] == 'w') { write(fds[1], "x", 1); }
        if (line[0] == 'n') {
            /* Another blocker, on a stack mapped only now. */
            size_t size = 1 << 20;
            void *stack = mmap(0, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            pthread_attr_t attr;
            pthread_attr_init(&attr);
            pthread_attr_setstack(&attr, stack, size);
            pthread_create(&t, &attr, blocker, 0);
        }
        printf("alive\n");
        fflush(stdout);
    }
    return 0;
}
"#;

/// The running target, killed and reaped on drop.
struct Target {
    proc: Proc,
}

impl Target {
    /// Build and start the target; returns it with the addresses of `spin`
    /// and `holder` it printed.
    fn start(dir: &std::path::Path) -> (Target, u64, u64) {
        let bin = build_sources(
            dir,
            "gcc",
            "t",
            &[("t.c", TARGET)],
            &["-O1", "-pthread", "-no-pie"],
        );
        let mut proc = Proc::spawn(&mut Command::new(&bin));
        let line = proc.line("the addresses", |_| true);
        let mut it = line
            .split_whitespace()
            .map(|h| u64::from_str_radix(h, 16).unwrap());
        let (spin, holder) = (it.next().unwrap(), it.next().unwrap());
        (Target { proc }, spin, holder)
    }

    /// Send `cmd`, return the line the target answers.
    fn ask(&mut self, cmd: &str) -> String {
        self.proc.send(cmd);
        self.proc
            .line(&format!("an answer to {cmd}"), |_| true)
            .trim()
            .to_string()
    }

    fn pid(&self) -> i32 {
        self.proc.pid()
    }
}

#[test]
fn waits_until_no_thread_is_inside_then_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut t, spin, _) = Target::start(dir.path());
    let pid = t.pid();
    let mem = Mem::open(pid).unwrap();
    let maps = Process::open(pid).unwrap().maps().unwrap();
    // 5 nops -> `jmp spin+5` (a jump to the sixth nop): the loop goes on.
    let w = Write {
        address: spin,
        expected: vec![0x90; 5],
        new: vec![0xe9, 0, 0, 0, 0],
    };
    let started = Instant::now();
    let took = write_stopped(pid, &mem, &maps, &[w], &[Overwrite { start: spin, len: 5 }]).unwrap();
    assert!(took < Duration::from_secs(5));
    assert_eq!(mem.read(spin, 5).unwrap(), vec![0xe9, 0, 0, 0, 0]);
    // The spinning thread survived the change and everything still runs.
    assert_eq!(t.ask("ping"), "alive");
    eprintln!("write after {:?}, stop {:?}", started.elapsed(), took);
}

/// A jump written over `holder`'s first bytes with every thread stopped
/// must be refused, naming the blocked thread's return address holder+6
/// (push rbx (1) + mov rax,rdi (3) + call *rax (2): strictly inside
/// [holder, holder+8)), with nothing written. The refusal's message.
fn refused_over_holder(pid: i32, holder: u64) -> String {
    refused_over_holder_with(pid, holder, &Process::open(pid).unwrap().maps().unwrap())
}

/// [`refused_over_holder`], with `maps` read by the caller.
fn refused_over_holder_with(pid: i32, holder: u64, maps: &[hotpatch::process::MapEntry]) -> String {
    let mem = Mem::open(pid).unwrap();
    let before = mem.read(holder, 8).unwrap();
    let w = Write {
        address: holder,
        expected: before[..5].to_vec(),
        new: vec![0xe9, 0, 0, 0, 0],
    };
    let overwrite = Overwrite {
        start: holder,
        len: 8,
    };
    let msg = write_stopped(pid, &mem, maps, &[w], &[overwrite])
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(&format!("{:#x}", holder + 6)) && msg.contains("nothing written"),
        "{msg}"
    );
    assert_eq!(mem.read(holder, 8).unwrap(), before, "nothing may change");
    msg
}

#[test]
fn refuses_while_a_return_address_is_inside() {
    let dir = tempfile::tempdir().unwrap();
    let (mut t, _, holder) = Target::start(dir.path());
    let pid = t.pid();
    let msg = refused_over_holder(pid, holder);
    assert!(msg.contains("stack"), "{msg}");
    // Unblock it: the thread returns through the untouched bytes.
    assert_eq!(t.ask("w"), "alive");
    assert_eq!(t.ask("ping"), "alive");
}

/// The thread holding the return address is lent to a program (waiting at
/// a rendezvous in the call region) during the stop: its registers show
/// the stub's, and the stop must still see where it will return to.
#[test]
fn refuses_while_a_thread_running_a_program_holds_a_return_address_inside() {
    use hotpatch::process::{Placement, Remote, threads};
    let dir = tempfile::tempdir().unwrap();
    let (mut t, _, holder) = Target::start(dir.path());
    let pid = t.pid();
    // The blocker: the thread other than main sleeping in read(2).
    let blocker = threads::threads(pid)
        .unwrap()
        .into_iter()
        .find(|th| th.tid != pid && th.state == 'S')
        .expect("the blocked thread")
        .tid;
    let mut remote = Remote::attach(pid, Placement::Anywhere).unwrap();
    remote.pin_thread(Some(blocker));
    let (mut p, _) = remote.program();
    let phase = p.wait();
    let mut run = remote.start(&p).unwrap();
    assert!(run.reach(phase).unwrap());
    assert_eq!(run.tid(), blocker);
    refused_over_holder(pid, holder);
    run.go(phase).unwrap();
    run.finish().0.unwrap();
    // Unblock it: the thread returns through the untouched bytes.
    assert_eq!(t.ask("w"), "alive");
    assert_eq!(t.ask("ping"), "alive");
}

/// The maps given to the stop were read before the thread holding the
/// return address existed: its stack is in none of them. The stop must
/// still search that stack (it reads the maps again) and refuse.
#[test]
fn refuses_when_the_holding_thread_is_newer_than_the_maps() {
    use hotpatch::process::threads::{SyscallState, threads};
    let dir = tempfile::tempdir().unwrap();
    let (mut t, _, holder) = Target::start(dir.path());
    let pid = t.pid();
    let in_read = |pid| {
        threads(pid)
            .unwrap()
            .iter()
            .filter(|th| matches!(th.syscall, SyscallState::InSyscall { nr: 0, .. }))
            .count()
    };
    let wait_for = |what: &str, ok: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ok() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    // The first blocker returns through `holder` and ends.
    assert_eq!(t.ask("w"), "alive");
    wait_for("the first blocker ends", &|| threads(pid).unwrap().len() == 2);
    let maps = Process::open(pid).unwrap().maps().unwrap();
    // A new blocker, on a stack the maps above do not show.
    assert_eq!(t.ask("n"), "alive");
    wait_for("the new blocker waits in read", &|| {
        threads(pid).unwrap().len() == 3 && in_read(pid) == 2
    });
    let msg = refused_over_holder_with(pid, holder, &maps);
    assert!(msg.contains("stack"), "{msg}");
    assert_eq!(t.ask("w"), "alive");
    assert_eq!(t.ask("ping"), "alive");
}
