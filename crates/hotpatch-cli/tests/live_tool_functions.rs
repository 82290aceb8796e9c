//! A patch may not replace a function hotpatch itself runs inside the
//! target (`dlopen`, `dlsym`, `dlerror`, `dlclose`, `__errno_location`,
//! and any function of the dynamic loader, whose code `dlopen` runs): the
//! apply is refused before anything touches the target, naming each
//! function and why, and the next apply of another patch works.

#[path = "common/live.rs"]
mod live;

use live::*;
use std::path::Path;

/// The bytes of every executable mapping of `pid` whose path ends with
/// `name`, read through /proc/PID/mem.
fn code_of(pid: i32, name: &str) -> Vec<u8> {
    let mut bytes = Vec::new();
    for line in maps(pid).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || !f[1].contains('x') || !f[5].ends_with(name) {
            continue;
        }
        let (lo, hi) = f[0].split_once('-').expect("range");
        let lo = u64::from_str_radix(lo, 16).expect("hex");
        let hi = u64::from_str_radix(hi, 16).expect("hex");
        bytes.extend(read_mem(pid, lo, (hi - lo) as usize));
    }
    assert!(!bytes.is_empty(), "{name} is not mapped executable");
    bytes
}

fn refused_untouched(target: &mut Target, patch: &Path, image: &str, names: &[&str], why: &str) {
    let pid = target.pid();
    let before = (code_of(pid, image), target.code(), maps(pid));
    let run = hotpatch(&["apply".to_string(), pid.to_string(), patch.display().to_string()]);
    let msg = run.failure();
    for name in names {
        assert!(
            msg.contains(&format!("`{name}` cannot be replaced")),
            "{name}: {msg}"
        );
    }
    assert!(msg.contains(why) && msg.contains("nothing was changed"), "{msg}");
    assert_eq!(
        (code_of(pid, image), target.code(), maps(pid)),
        before,
        "the refused apply changed the target (code or mappings)"
    );
}

#[test]
fn functions_the_tool_runs_are_refused_and_the_next_apply_works() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let exe = build_target(d, "gcc", "target", TARGET_C, &[]);
    let libc_patch = build_patch(d, "tool_functions", include_str!("live/tool_functions_patch.c"));
    let loader_patch = build_patch(
        d,
        "loader",
        "#include \"hotpatch.h\"\nHOTPATCH_TARGET(\"ld-linux-x86-64.so.2\", \"\");\n\
         HOTPATCH_ORIGINAL(int, _dl_catch_exception, (void *, void *, void *));\n\
         int pt_catch(void *e, void *op, void *arg) { return orig__dl_catch_exception(e, op, arg); }\n\
         HOTPATCH_REPLACE(_dl_catch_exception, pt_catch);\n",
    );
    let patch_a = build_patch(d, "patch_a", PATCH_A_C);
    let mut target = Target::start(&exe, 2, None, Workers::Duty);

    refused_untouched(
        &mut target,
        &libc_patch,
        "/libc.so.6",
        &["dlopen", "dlsym", "dlerror", "dlclose", "__errno_location"],
        "hotpatch calls `dlopen` inside the target to load patches",
    );
    refused_untouched(
        &mut target,
        &loader_patch,
        "/ld-linux-x86-64.so.2",
        &["_dl_catch_exception"],
        "runs the code of the dynamic loader",
    );

    // An unrelated patch still goes in, and comes out.
    apply(target.pid(), &patch_a, &[]);
    assert_eq!(target.version(), (1, 1));
    // And the refusal holds with a patch already applied.
    refused_untouched(
        &mut target,
        &libc_patch,
        "/libc.so.6",
        &["dlopen"],
        "to load patches",
    );
    revert(target.pid(), None);
    assert_eq!(target.version(), (0, 0));
    assert!(target.proc.alive());
}
