//! Signed patches, the policy and the audit log, against a running target.
//!
//! - `keygen`, `sign` (in place by rename, `-o`, re-sign) and `verify`.
//! - Unsigned, tampered, untrusted and trusted patches, with a policy that
//!   requires a signature and with one that does not. With the policy on,
//!   a refused patch changes nothing in the target (maps, code bytes,
//!   `list`); a trusted one applies, runs, and `list` shows its signer.
//! - A group-writable patch and a symlinked policy file are refused.
//! - Every apply and revert sends an audit record to the policy's
//!   `audit_socket` with who, target, build-id, SHA-256, signer, result.

#[path = "common/live.rs"]
mod live;

use live::*;
use sha2::{Digest, Sha256};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

/// A test's files: a target and patch A, two key pairs (`ops` trusted in
/// `keys/`, `other` not), a log socket and two policies.
struct Setup {
    dir: tempfile::TempDir,
    exe: PathBuf,
    patch: PathBuf,
    keys: PathBuf,
    /// `require_signature = true`, keys in `keys/`, audit to `log`.
    strict: PathBuf,
    /// `require_signature = false`, keys in `keys/`, audit to `log`.
    lenient: PathBuf,
    log: UnixDatagram,
}

fn run_ok(args: &[&str]) -> String {
    let run = hotpatch(args);
    assert_eq!(run.code(), 0, "hotpatch {args:?}: {}", run.stderr);
    run.stdout
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let exe = build_target(d, "gcc", "target", TARGET_C, &[]);
        let patch = build_patch(d, "patch_a", PATCH_A_C);
        let keys = d.join("keys");
        std::fs::create_dir(&keys).expect("mkdir keys");
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o755)).expect("chmod keys");
        let secrets = d.join("secrets");
        std::fs::create_dir(&secrets).expect("mkdir secrets");
        for name in ["ops", "other"] {
            run_ok(&["keygen", name, "--dir", path_str(&secrets)]);
        }
        std::fs::copy(secrets.join("ops.pub"), keys.join("ops.pub")).expect("install ops.pub");
        let log_path = d.join("log");
        let log = UnixDatagram::bind(&log_path).expect("bind the log socket");
        log.set_read_timeout(Some(WAIT)).expect("timeout");
        let policy = |name: &str, require: bool| {
            let p = d.join(name);
            std::fs::write(
                &p,
                format!(
                    "require_signature = {require}\nkeys_dir = \"{}\"\naudit_socket = \"{}\"\n",
                    keys.display(),
                    log_path.display()
                ),
            )
            .expect("write policy");
            p
        };
        Setup {
            strict: policy("strict.toml", true),
            lenient: policy("lenient.toml", false),
            exe,
            patch,
            keys,
            log,
            dir,
        }
    }

    fn secret(&self, name: &str) -> PathBuf {
        self.dir.path().join("secrets").join(format!("{name}.key"))
    }

    /// Patch A signed by `key` into `name`.
    fn signed(&self, key: &str, name: &str) -> PathBuf {
        let out = self.dir.path().join(name);
        run_ok(&[
            "sign",
            path_str(&self.patch),
            "--key",
            path_str(&self.secret(key)),
            "-o",
            path_str(&out),
        ]);
        out
    }

    /// `hotpatch apply PID PATCH --json --policy POLICY`.
    fn apply(&self, pid: i32, patch: &Path, policy: &Path) -> Run {
        hotpatch(&[
            "apply",
            &pid.to_string(),
            path_str(patch),
            "--json",
            "--policy",
            path_str(policy),
        ])
    }

    /// The next audit record, as `key → value` (values unquoted).
    fn audit(&self) -> Vec<(String, String)> {
        let mut buf = vec![0u8; 65536];
        let n = self
            .log
            .recv(&mut buf)
            .expect("an audit record within the timeout");
        let text = String::from_utf8(buf[..n].to_vec()).expect("ASCII record");
        let (head, message) = text.split_once(": ").expect("tag: message");
        assert!(head.starts_with('<') && head.contains(" hotpatch["), "{text}");
        parse_fields(message)
    }

    fn no_more_audit(&self) {
        self.log.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 4096];
        let extra = self
            .log
            .recv(&mut buf)
            .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
        assert!(extra.is_err(), "an unexpected audit record: {extra:?}");
        self.log.set_nonblocking(false).expect("blocking");
    }
}

/// `key=value key="quoted \" value"` → pairs.
fn parse_fields(message: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = message;
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=').expect("key=value");
        let (value, after) = if let Some(q) = after.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = q.char_indices();
            let mut end = q.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, e)) = chars.next() {
                            v.push(e);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => v.push(c),
                }
            }
            (v, &q[end..])
        } else {
            let (v, a) = after.split_once(' ').unwrap_or((after, ""));
            (v.to_string(), a)
        };
        out.push((key.to_string(), value));
        rest = after.trim_start();
    }
    out
}

fn field<'a>(record: &'a [(String, String)], key: &str) -> &'a str {
    record
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key} in {record:?}"))
}

fn sha256_hex(path: &Path) -> String {
    Sha256::digest(std::fs::read(path).expect("read"))
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A copy of `signed` with one byte of its code changed (a byte of `f_a`).
fn tampered(setup: &Setup, signed: &Path) -> PathBuf {
    let mut bytes = std::fs::read(signed).expect("read");
    let image = hotpatch::Image::parse(signed, bytes.clone()).expect("parse");
    let f_a = image
        .functions()
        .iter()
        .find(|f| f.names.iter().any(|n| n.name == "f_a"))
        .expect("f_a in patch A");
    let at = image.file_range(f_a.address, 1).expect("f_a in the file").start;
    bytes[at] ^= 0x01;
    let out = setup.dir.path().join("tampered.so");
    std::fs::write(&out, bytes).expect("write");
    out
}

#[test]
fn keygen_sign_verify() {
    let s = Setup::new();
    // keygen never overwrites, and the private key is for its owner only.
    let secrets = s.dir.path().join("secrets");
    let again = hotpatch(&["keygen", "ops", "--dir", path_str(&secrets)]);
    assert!(again.failure().contains("ops.key"), "{}", again.stderr);
    assert_eq!(
        std::fs::metadata(s.secret("ops")).expect("key").mode() & 0o777,
        0o600
    );
    let public = std::fs::read_to_string(secrets.join("ops.pub")).expect("pub");
    assert!(public.starts_with("hotpatch-ed25519-public v1 ops "), "{public}");

    // verify: unsigned, then signed by ops (trusted), then by other.
    let keys = path_str(&s.keys);
    let v = hotpatch(&[
        "verify",
        path_str(&s.patch),
        "--keys",
        keys,
        "--policy",
        path_str(&s.lenient),
    ]);
    assert!(v.failure().contains("not signed"), "{}", v.stderr);

    // Sign in place: a new file is renamed over the old one.
    let inplace = s.dir.path().join("inplace.so");
    std::fs::copy(&s.patch, &inplace).expect("copy");
    let inode = std::fs::metadata(&inplace).expect("meta").ino();
    let out = run_ok(&["sign", path_str(&inplace), "--key", path_str(&s.secret("ops"))]);
    assert!(out.contains("signed by ops"), "{out}");
    assert_ne!(
        std::fs::metadata(&inplace).expect("meta").ino(),
        inode,
        "truncated in place"
    );
    let leftovers: Vec<_> = std::fs::read_dir(s.dir.path())
        .expect("ls")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".hotpatch-sign-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let out = run_ok(&["verify", path_str(&inplace), "--policy", path_str(&s.lenient)]);
    assert!(out.contains("signed by ops") && out.contains("trusted"), "{out}");

    // Re-signing with another key replaces the signature.
    run_ok(&["sign", path_str(&inplace), "--key", path_str(&s.secret("other"))]);
    let v = hotpatch(&["verify", path_str(&inplace), "--policy", path_str(&s.lenient)]);
    assert!(v.failure().contains("not trusted"), "{}", v.stderr);
    let signed_len = std::fs::metadata(&inplace).expect("meta").len();
    run_ok(&["sign", path_str(&inplace), "--key", path_str(&s.secret("ops"))]);
    assert_eq!(
        std::fs::metadata(&inplace).expect("meta").len(),
        signed_len,
        "a second signature was added"
    );
    run_ok(&["verify", path_str(&inplace), "--policy", path_str(&s.lenient)]);

    // Tampered: a bad signature, whatever the policy.
    let bad = tampered(&s, &inplace);
    let v = hotpatch(&["verify", path_str(&bad), "--policy", path_str(&s.lenient)]);
    assert!(v.failure().contains("bad signature"), "{}", v.stderr);

    // A private key others can read is refused.
    std::fs::set_permissions(s.secret("ops"), std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let r = hotpatch(&["sign", path_str(&inplace), "--key", path_str(&s.secret("ops"))]);
    assert!(r.failure().contains("readable by others"), "{}", r.stderr);
}

#[test]
fn policy_refuses_before_touching_the_target() {
    let _serial = serial();
    let s = Setup::new();
    let trusted = s.signed("ops", "trusted.so");
    let untrusted = s.signed("other", "untrusted.so");
    let bad = tampered(&s, &trusted);
    let mut target = Target::start(&s.exe, 2, None, Workers::Idle);
    let pid = target.pid();
    let maps_before = maps(pid);
    let code_before = target.code();

    for (patch, why) in [
        (&s.patch, "not signed"),
        (&bad, "bad signature"),
        (&untrusted, "not trusted"),
    ] {
        let run = s.apply(pid, patch, &s.strict);
        let line = run.failure();
        assert!(
            line.contains(why) && line.contains("refused"),
            "{}: {line}",
            patch.display()
        );
        assert!(
            line.contains(&format!("nothing in process {pid} was changed")),
            "{line}"
        );
        assert_eq!(maps(pid), maps_before, "{}: maps changed", patch.display());
        assert_eq!(target.code(), code_before, "{}: code changed", patch.display());
        assert_eq!(listed_ids(pid), Vec::<u64>::new());
        let record = s.audit();
        assert_eq!(field(&record, "result"), "refused", "{record:?}");
        assert_eq!(field(&record, "sha256"), sha256_hex(patch));
        assert!(field(&record, "error").contains(why), "{record:?}");
    }
    assert_eq!(target.version(), (0, 0));

    // A group-writable patch, even signed by a trusted key.
    let writable = s.dir.path().join("writable.so");
    std::fs::copy(&trusted, &writable).expect("copy");
    std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o664)).expect("chmod");
    let run = s.apply(pid, &writable, &s.strict);
    assert!(run.failure().contains("writable by its group"), "{}", run.stderr);
    assert_eq!(field(&s.audit(), "result"), "refused");
    // A symlinked policy file.
    let link = s.dir.path().join("link.toml");
    std::os::unix::fs::symlink(&s.strict, &link).expect("symlink");
    let run = s.apply(pid, &trusted, &link);
    assert!(run.failure().contains("symbolic link"), "{}", run.stderr);
    // A group-writable keys directory.
    std::fs::set_permissions(&s.keys, std::fs::Permissions::from_mode(0o775)).expect("chmod");
    let run = s.apply(pid, &trusted, &s.strict);
    assert!(run.failure().contains("keys directory"), "{}", run.stderr);
    std::fs::set_permissions(&s.keys, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let _ = s.audit();
    assert_eq!(maps(pid), maps_before);
    assert_eq!(target.code(), code_before);

    // Trusted: applied, runs, listed with its signer and SHA-256.
    let applied = s.apply(pid, &trusted, &s.strict).json();
    assert_eq!(applied["patch"]["signer"], "ops", "{applied}");
    assert_eq!(target.version(), (1, 1), "the signed patch runs");
    let listed = list(pid);
    let p = &listed["patches"][0];
    assert_eq!(p["signer"], "ops", "{listed}");
    assert_eq!(p["sha256"], sha256_hex(&trusted).as_str(), "{listed}");
    let human = run_ok(&["list", &pid.to_string()]);
    assert!(
        human.contains(&format!("sha256 {}, signed by ops", &sha256_hex(&trusted)[..16])),
        "{human}"
    );
    let record = s.audit();
    assert_eq!(field(&record, "result"), "ok");
    assert_eq!(field(&record, "signer"), "ops");
    revert(pid, None);
    assert_eq!(target.version(), (0, 0));
}

#[test]
fn without_the_policy_only_bad_signatures_are_refused() {
    let _serial = serial();
    let s = Setup::new();
    let trusted = s.signed("ops", "trusted.so");
    let untrusted = s.signed("other", "untrusted.so");
    let bad = tampered(&s, &trusted);
    let mut target = Target::start(&s.exe, 2, None, Workers::Idle);
    let pid = target.pid();
    let maps_before = maps(pid);
    let code_before = target.code();

    let run = s.apply(pid, &bad, &s.lenient);
    assert!(run.failure().contains("bad signature"), "{}", run.stderr);
    assert_eq!(maps(pid), maps_before);
    assert_eq!(target.code(), code_before);
    assert_eq!(field(&s.audit(), "result"), "refused");

    for (patch, signer) in [
        (&s.patch, None),
        (&untrusted, Some("untrusted key ")),
        (&trusted, Some("ops")),
    ] {
        let applied = s.apply(pid, patch, &s.lenient).json();
        assert_eq!(target.version(), (1, 1), "{}", patch.display());
        let p = &list(pid)["patches"][0];
        match signer {
            None => assert!(p["signer"].is_null(), "{p}"),
            Some(prefix) => assert!(
                p["signer"].as_str().is_some_and(|s| s.starts_with(prefix)),
                "{}: {p}",
                patch.display()
            ),
        }
        assert_eq!(p["sha256"], sha256_hex(patch).as_str());
        let record = s.audit();
        assert_eq!(field(&record, "result"), "ok");
        assert_eq!(field(&record, "patch_id"), applied["patch"]["id"].to_string());
        run_ok(&[
            "revert",
            &pid.to_string(),
            "--all",
            "--policy",
            path_str(&s.lenient),
        ]);
        let record = s.audit();
        assert_eq!(field(&record, "action"), "revert");
        assert_eq!(field(&record, "sha256"), sha256_hex(patch));
        assert_eq!(target.version(), (0, 0));
    }
}

#[test]
fn audit_records_apply_and_revert() {
    let _serial = serial();
    let s = Setup::new();
    let trusted = s.signed("ops", "trusted.so");
    let mut target = Target::start(&s.exe, 1, None, Workers::Idle);
    let pid = target.pid();
    let exe = std::fs::canonicalize(&s.exe).expect("canonicalize");
    let build_id = hotpatch::Image::open(&s.exe)
        .expect("read target")
        .build_id_hex()
        .expect("the target has a build-id");
    let sha = sha256_hex(&trusted);

    let run_as_alice = |args: &[&str]| {
        let mut cmd = hotpatch_command(args);
        cmd.env("SUDO_USER", "alice");
        run_within(WAIT, &mut cmd)
    };
    let pid_s = pid.to_string();
    let policy = path_str(&s.strict);
    let applied = run_as_alice(&["apply", &pid_s, path_str(&trusted), "--json", "--policy", policy]).json();
    let id = applied["patch"]["id"].to_string();
    let check = |record: &[(String, String)], action: &str| {
        for (key, want) in [
            ("action", action),
            ("result", "ok"),
            ("uid", "0"),
            ("sudo_user", "alice"),
            ("pid", pid_s.as_str()),
            ("exe", path_str(&exe)),
            ("image_build_id", build_id.as_str()),
            ("patch", path_str(&trusted)),
            ("sha256", sha.as_str()),
            ("signer", "ops"),
            ("patch_id", id.as_str()),
        ] {
            assert_eq!(field(record, key), want, "{key} in {record:?}");
        }
    };
    check(&s.audit(), "apply");
    assert_eq!(target.version(), (1, 1));

    let run = run_as_alice(&["revert", &pid_s, &id, "--json", "--policy", policy]);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    check(&s.audit(), "revert");
    assert_eq!(target.version(), (0, 0));

    // A failed revert is logged too.
    let run = run_as_alice(&["revert", &pid_s, "77", "--policy", policy]);
    run.failure();
    let record = s.audit();
    assert_eq!(field(&record, "action"), "revert");
    assert_eq!(field(&record, "result"), "failed");
    assert_eq!(field(&record, "patch_id"), "77");
    s.no_more_audit();

    // No log socket: a warning, and the apply still succeeds.
    let quiet = s.dir.path().join("nolog.toml");
    std::fs::write(
        &quiet,
        format!(
            "require_signature = true\nkeys_dir = \"{}\"\naudit_socket = \"{}\"\n",
            s.keys.display(),
            s.dir.path().join("no-such-socket").display()
        ),
    )
    .expect("write");
    let run = s.apply(pid, &trusted, &quiet);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(
        run.stderr
            .starts_with("hotpatch: warning: audit record not logged"),
        "{}",
        run.stderr
    );
    assert_eq!(target.version(), (1, 1));
}
