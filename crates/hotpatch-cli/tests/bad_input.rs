//! Bad input: exit code 1 and one line on stderr, `hotpatch: …`, naming
//! the file or pid, never a panic. A bad command line exits 2.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Assert the failure contract; returns the message.
fn assert_fails(out: Output, names: &str) -> String {
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {stderr}");
    assert!(out.stdout.is_empty(), "no output on stdout: {:?}", out.stdout);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.ends_with('\n') && stderr.lines().count() == 1,
        "one line: {stderr:?}"
    );
    assert!(stderr.starts_with("hotpatch: "), "{stderr}");
    assert!(stderr.contains(names), "{stderr:?} does not name {names}");
    stderr
}

fn check(path: &Path) -> String {
    let out = hotpatch().arg("check").arg(path).arg("--json").output().unwrap();
    assert_fails(out, path.to_str().unwrap())
}

fn check_pid(pid: &str) -> String {
    let out = hotpatch()
        .args(["check", "--pid", pid, "--json"])
        .output()
        .unwrap();
    assert_fails(out, pid)
}

fn prepare(path: &Path, output: &Path) -> String {
    let out = hotpatch()
        .arg("prepare")
        .arg(path)
        .arg("-o")
        .arg(output)
        .output()
        .unwrap();
    assert_fails(out, path.to_str().unwrap())
}

/// A small real executable to damage.
fn real_binary(dir: &Path) -> PathBuf {
    CBuild::new(Cc::Gcc, Some((8, 6)), true, true).compile(dir)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let msg = check(&dir.path().join("no-such-file"));
    // Said once: the cause is not repeated by the error chain.
    assert_eq!(msg.matches("No such file").count(), 1, "{msg}");
    let msg = prepare(&dir.path().join("no-such-file"), &dir.path().join("out"));
    assert!(msg.contains("No such file"), "{msg}");
    assert!(!dir.path().join("out").exists());
}

#[test]
fn directory() {
    let dir = tempfile::tempdir().unwrap();
    let msg = check(dir.path());
    assert_eq!(msg.matches("a directory, not a regular file").count(), 1, "{msg}");
}

#[test]
fn text_file() {
    let dir = tempfile::tempdir().unwrap();
    let msg = check(&write(
        dir.path(),
        "notes.txt",
        b"hello, this is not an ELF file\n",
    ));
    assert!(msg.contains("not an ELF"), "{msg}");
}

#[test]
fn empty_file() {
    let dir = tempfile::tempdir().unwrap();
    let msg = check(&write(dir.path(), "empty", b""));
    assert!(msg.contains("empty"), "{msg}");
    let msg = check(&write(dir.path(), "three", b"\x7fEL"));
    assert!(msg.contains("not an ELF"), "{msg}");
}

#[test]
fn truncated_elf() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(real_binary(dir.path())).unwrap();
    for (name, len) in [
        ("first-16", 16),
        ("first-64", 64),
        ("first-100", 100),
        ("half", bytes.len() / 2),
        ("all-but-one", bytes.len() - 1),
    ] {
        let msg = check(&write(dir.path(), name, &bytes[..len]));
        assert!(
            msg.contains("truncated") || msg.contains("corrupt"),
            "{name}: {msg}"
        );
    }
}

#[test]
fn elf32() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(real_binary(dir.path())).unwrap();
    bytes[4] = 1; // EI_CLASS = ELFCLASS32
    let msg = check(&write(dir.path(), "elf32", &bytes));
    assert!(msg.contains("32-bit"), "{msg}");
    let p = dir.path().join("elf32");
    let msg = prepare(&p, &dir.path().join("out"));
    assert!(msg.contains("32-bit"), "{msg}");
}

#[test]
fn big_endian_and_bad_class() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(real_binary(dir.path())).unwrap();
    let mut bytes = good.clone();
    bytes[5] = 2; // EI_DATA = ELFDATA2MSB
    let msg = check(&write(dir.path(), "big-endian", &bytes));
    assert!(msg.contains("big-endian"), "{msg}");
    let mut bytes = good;
    bytes[4] = 7;
    check(&write(dir.path(), "class-7", &bytes));
}

#[test]
fn aarch64() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(real_binary(dir.path())).unwrap();
    bytes[18..20].copy_from_slice(&183u16.to_le_bytes()); // e_machine = EM_AARCH64
    let msg = check(&write(dir.path(), "arm64", &bytes));
    assert!(msg.contains("aarch64"), "{msg}");
}

#[test]
fn relocatable_object() {
    let dir = tempfile::tempdir().unwrap();
    let src = write(dir.path(), "obj.c", b"int f(int x) { return x + 1; }\n");
    let obj = dir.path().join("obj.o");
    run_ok(Command::new("gcc").args(["-O2", "-c", "-o"]).arg(&obj).arg(&src));
    let msg = check(&obj);
    assert!(msg.contains("relocatable"), "{msg}");
}

#[test]
fn nonexistent_pid() {
    let msg = check_pid("999999999");
    assert!(msg.contains("no such process"), "{msg}");
}

#[test]
fn reaped_child_pid() {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    let msg = check_pid(&pid.to_string());
    assert!(msg.contains("no such process"), "{msg}");
}

#[test]
fn bad_command_lines_exit_2() {
    for args in [
        &["check"][..],
        &["check", "--pid", "notanumber"],
        &["check", "/bin/true", "--pid", "1"],
        &["prepare", "/bin/true"],
        &["frobnicate"],
        &[],
    ] {
        let out = hotpatch().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    }
}
