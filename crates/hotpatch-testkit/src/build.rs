//! Targets and patch libraries compiled at test time, into a directory the
//! test owns (a `tempfile::TempDir`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// `include/` of the repository (`hotpatch.h`).
pub fn include_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../include")
}

/// `-I` and [`include_dir`], as one compiler argument.
pub fn include_arg() -> String {
    format!("-I{}", include_dir().display())
}

/// Run a compiler (`gcc`, `clang`, `rustc`…) with `args` in `dir`, panic
/// with its stderr if it fails.
pub fn compile(cc: &str, args: &[&str], dir: &Path) {
    let out = Command::new(cc)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cc}: {e}"));
    assert!(
        out.status.success(),
        "{cc} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Write each `(file name, text)` of `sources` into `dir` and run
/// `cc FLAGS… -o OUT FILES…` there; returns `dir/OUT`.
pub fn build_sources(dir: &Path, cc: &str, out: &str, sources: &[(&str, &str)], flags: &[&str]) -> PathBuf {
    let mut args = flags.to_vec();
    args.extend(["-o", out]);
    for (name, text) in sources {
        std::fs::write(dir.join(name), text)
            .unwrap_or_else(|e| panic!("write {name} in {}: {e}", dir.display()));
        args.push(name);
    }
    compile(cc, &args, dir);
    dir.join(out)
}

/// Write `source` to `dir/name.c` and build a prepared executable `dir/name`
/// (`-O2 -pthread -fpatchable-function-entry=8,6`, plus `extra`).
pub fn build_target(dir: &Path, cc: &str, name: &str, source: &str, extra: &[&str]) -> PathBuf {
    let mut flags = vec!["-fpatchable-function-entry=8,6"];
    flags.extend_from_slice(extra);
    build_unprepared(dir, cc, name, source, &flags)
}

/// Write `source` to `dir/name.c` and build an executable `dir/name`
/// without padding (`-O2 -pthread`, plus `extra`).
pub fn build_unprepared(dir: &Path, cc: &str, name: &str, source: &str, extra: &[&str]) -> PathBuf {
    let mut flags = vec!["-O2", "-pthread"];
    flags.extend_from_slice(extra);
    build_sources(dir, cc, name, &[(&format!("{name}.c"), source)], &flags)
}

/// Write `source` to `dir/name.c` and build the patch library `dir/name.so`
/// with gcc (`-O2 -shared -fPIC`, `hotpatch.h` on the include path).
pub fn build_patch(dir: &Path, name: &str, source: &str) -> PathBuf {
    build_sources(
        dir,
        "gcc",
        &format!("{name}.so"),
        &[(&format!("{name}.c"), source)],
        &["-O2", "-shared", "-fPIC", &include_arg()],
    )
}
