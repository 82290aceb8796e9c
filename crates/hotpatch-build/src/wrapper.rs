//! The compiler wrapper: the build command runs with a directory of
//! `cc`, `gcc`, `clang`, … links to this program first on its `PATH`. Each
//! compile gets function and data sections and is logged (directory,
//! arguments, source, object), so that the builder can compare objects and
//! compile a changed unit again for the patch. A compile-and-link line
//! (`cc -O2 -o prog a.c b.c`) also gets each source compiled to a kept
//! object. Everything else runs as it was.

use std::ffi::OsString;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The log the wrapper appends to (JSON lines); set by the builder.
pub const LOG_ENV: &str = "HOTPATCH_BUILD_LOG";
/// Where the wrapper keeps a copy of every object it compiles.
pub const KEEP_ENV: &str = "HOTPATCH_BUILD_KEEP";
/// The `PATH` without the wrapper directory, to find the real compiler.
pub const PATH_ENV: &str = "HOTPATCH_BUILD_PATH";
/// The names the wrapper answers to.
pub const COMPILERS: &[&str] = &["cc", "gcc", "c++", "g++", "clang", "clang++"];
/// The name cargo's `RUSTC_WRAPPER` runs it as (`hotpatch-rustc RUSTC ARGS…`).
pub const RUSTC_WRAPPER: &str = "hotpatch-rustc";

/// Flags every logged compile gets.
pub const SECTION_FLAGS: &[&str] = &["-ffunction-sections", "-fdata-sections"];

/// One compile of one source file, as logged.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Compile {
    /// The real compiler.
    pub compiler: PathBuf,
    pub cwd: PathBuf,
    /// The arguments without the sources and without `-o FILE`/`-c`.
    pub common: Vec<String>,
    /// As given (relative to `cwd` or absolute).
    pub source: String,
    /// The object file the build wrote, absolute.
    pub object: PathBuf,
    /// The unit compiled again with function and data sections, for the
    /// comparison (kept: a build may move, rename or delete its objects;
    /// zlib's Makefile renames them to `.lo`).
    pub kept: PathBuf,
    /// A copy of the build's own object, as the build compiled it: what the
    /// binary is made of, for the proof (the assembler may encode a jump
    /// differently when every function has a section of its own).
    #[serde(default)]
    pub plain: Option<PathBuf>,
    /// A Rust crate compiled by rustc: `common` is rustc's whole command
    /// line, and `kept` its codegen units merged into one object.
    #[serde(default)]
    pub rust: bool,
    /// The environment cargo gave rustc (`CARGO_*`, `OUT_DIR`: `env!` in the
    /// crate reads it), for compiling it again.
    #[serde(default)]
    pub env: Vec<(String, String)>,
}

/// Options that take the next argument as their value.
const TAKES_VALUE: &[&str] = &[
    "-o",
    "-I",
    "-D",
    "-U",
    "-include",
    "-imacros",
    "-isystem",
    "-iquote",
    "-idirafter",
    "-iprefix",
    "-MF",
    "-MT",
    "-MQ",
    "-x",
    "-L",
    "-Xlinker",
    "-Xassembler",
    "-Xpreprocessor",
    "-aux-info",
    "-T",
    "-u",
    "-z",
    "-e",
    "--param",
    "-isysroot",
    "--sysroot",
    "-wrapper",
];

const SOURCE_EXTENSIONS: &[&str] = &["c", "cc", "cpp", "cxx", "c++", "C", "i", "ii"];

/// What a compiler command line does, as far as the wrapper cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLine {
    pub sources: Vec<String>,
    pub output: Option<String>,
    /// `-c`: compile only.
    pub compile_only: bool,
    /// `-E`, `-S`, `-M`, `-MM`, or `-fsyntax-only`: no object.
    pub no_object: bool,
    /// Everything but sources, `-o FILE` and `-c`.
    pub common: Vec<String>,
}

/// Split a compiler command line. Pure.
pub fn parse(args: &[String]) -> CommandLine {
    let mut line = CommandLine {
        sources: Vec::new(),
        output: None,
        compile_only: false,
        no_object: false,
        common: Vec::new(),
    };
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if a == "-o" {
            line.output = args.get(i + 1).cloned();
            i += 2;
            continue;
        }
        if TAKES_VALUE.contains(&a.as_str()) {
            line.common.push(a.clone());
            if let Some(v) = args.get(i + 1) {
                line.common.push(v.clone());
            }
            i += 2;
            continue;
        }
        match a.as_str() {
            "-c" => line.compile_only = true,
            "-E" | "-S" | "-M" | "-MM" | "-fsyntax-only" => {
                line.no_object = true;
                line.common.push(a.clone());
            }
            _ if !a.starts_with('-') && is_source(a) => line.sources.push(a.clone()),
            _ => line.common.push(a.clone()),
        }
        i += 1;
    }
    line
}

fn is_source(arg: &str) -> bool {
    Path::new(arg)
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| SOURCE_EXTENSIONS.contains(&e))
}

/// Run as the wrapper if this process was started as one (a compiler name
/// with the builder's log set): returns the exit code to exit with.
pub fn main_if_wrapping() -> Option<i32> {
    let mut argv = std::env::args_os();
    let argv0 = argv.next()?;
    let name = Path::new(&argv0).file_name()?.to_str()?.to_string();
    if !COMPILERS.contains(&name.as_str()) && name != RUSTC_WRAPPER {
        return None;
    }
    let log = std::env::var_os(LOG_ENV)?;
    let args: Vec<String> = argv.map(|a| a.to_string_lossy().into_owned()).collect();
    let result = if name == RUSTC_WRAPPER {
        wrap_rustc(&args, Path::new(&log))
    } else {
        wrap(&name, &args, Path::new(&log))
    };
    Some(match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hotpatch build: compiler wrapper ({name}): {e}");
            1
        }
    })
}

/// The real compiler `name`: the first on the original `PATH` that is not
/// this program.
fn real_compiler(name: &str) -> Result<PathBuf, String> {
    let path = std::env::var_os(PATH_ENV)
        .or_else(|| std::env::var_os("PATH"))
        .unwrap_or_default();
    let me = std::env::current_exe().ok().and_then(|p| p.canonicalize().ok());
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        let Ok(real) = candidate.canonicalize() else {
            continue;
        };
        if Some(&real) != me.as_ref() && candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(format!("no `{name}` on the PATH"))
}

fn run(compiler: &Path, args: &[String]) -> Result<i32, String> {
    let status = Command::new(compiler)
        .args(args)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", compiler.display()))?;
    Ok(status.code().unwrap_or(1))
}

fn wrap(name: &str, args: &[String], log: &Path) -> Result<i32, String> {
    let compiler = real_compiler(name)?;
    let line = parse(args);
    if line.no_object || line.sources.is_empty() {
        let os: Vec<OsString> = args.iter().map(OsString::from).collect();
        let status = Command::new(&compiler)
            .args(os)
            .status()
            .map_err(|e| format!("cannot run {}: {e}", compiler.display()))?;
        return Ok(status.code().unwrap_or(1));
    }
    let cwd = std::env::current_dir().map_err(|e| format!("no current directory: {e}"))?;
    let keep = std::env::var_os(KEEP_ENV)
        .map(PathBuf::from)
        .ok_or("no directory for kept objects")?;
    // The build's own command runs as given: its objects, and the binary
    // linked from them, are the user's build's byte for byte (the proof
    // compares those). Each source is also compiled with function and data
    // sections into the keep directory, for the comparison.
    let code = run(&compiler, args)?;
    if code != 0 {
        return Ok(code);
    }
    let mut compiles = Vec::new();
    for source in &line.sources {
        let (kept, plain) = if line.compile_only {
            let object = match (&line.output, line.sources.len()) {
                (Some(o), 1) => cwd.join(o),
                _ => cwd.join(
                    Path::new(source)
                        .with_extension("o")
                        .file_name()
                        .unwrap_or_default(),
                ),
            };
            let plain = keep.join(format!("{}.plain", kept_name(&object)));
            std::fs::copy(&object, &plain).map_err(|e| format!("keeping {}: {e}", object.display()))?;
            (keep.join(kept_name(&object)), plain)
        } else {
            // Compile and link: the objects were temporary; make both.
            let base = kept_name(&cwd.join(source));
            let plain = keep.join(format!("{base}.o.plain"));
            let code = run(&compiler, &compile_to(&line.common, &[], source, &plain))?;
            if code != 0 {
                return Ok(code);
            }
            (keep.join(format!("{base}.o")), plain)
        };
        let code = run(&compiler, &compile_to(&line.common, SECTION_FLAGS, source, &kept))?;
        if code != 0 {
            return Ok(code);
        }
        compiles.push(Compile {
            compiler: compiler.clone(),
            cwd: cwd.clone(),
            common: line.common.clone(),
            source: source.clone(),
            object: match (&line.output, line.compile_only, line.sources.len()) {
                (Some(o), true, 1) => cwd.join(o),
                _ => kept.clone(),
            },
            kept,
            plain: Some(plain),
            rust: false,
            env: Vec::new(),
        });
    }
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(log)
        .map_err(|e| format!("{}: {e}", log.display()))?;
    for c in compiles {
        let mut text = serde_json::to_string(&c).map_err(|e| e.to_string())?;
        text.push('\n');
        // One write per line: parallel compiles append whole lines.
        file.write_all(text.as_bytes())
            .map_err(|e| format!("{}: {e}", log.display()))?;
    }
    Ok(0)
}

/// `COMMON FLAGS… -c SOURCE -o OBJECT`.
fn compile_to(common: &[String], flags: &[&str], source: &str, object: &Path) -> Vec<String> {
    let mut args = common.to_vec();
    args.extend(flags.iter().map(|f| f.to_string()));
    args.extend([
        "-c".to_string(),
        source.to_string(),
        "-o".to_string(),
        object.display().to_string(),
    ]);
    args
}

/// The value of rustc's option `name` (`--out-dir X`, `--crate-name X`,
/// `-C extra-filename=X`).
fn rustc_option<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, a)| {
        if a == name {
            args.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix(name).and_then(|rest| rest.strip_prefix('='))
        }
    })
}

/// `-C extra-filename=X` (as one argument or two).
fn extra_filename(args: &[String]) -> &str {
    args.iter()
        .enumerate()
        .find_map(|(i, a)| {
            let value = if a == "-C" {
                args.get(i + 1).map(String::as_str)
            } else {
                a.strip_prefix("-C")
            };
            value.and_then(|v| v.strip_prefix("extra-filename="))
        })
        .unwrap_or("")
}

/// Run rustc for cargo. A crate of the workspace (`CARGO_PRIMARY_PACKAGE`)
/// that is compiled to code keeps its codegen units (`-C save-temps`),
/// merged with `ld -r` into one object per crate; dependencies and
/// cargo's queries (`-vV`, `--print`) run as they are.
fn wrap_rustc(args: &[String], log: &Path) -> Result<i32, String> {
    let (rustc, rest) = args.split_first().ok_or("no rustc to run")?;
    let primary = std::env::var_os("CARGO_PRIMARY_PACKAGE").is_some();
    let crate_name = rustc_option(rest, "--crate-name").map(str::to_string);
    let out_dir = rustc_option(rest, "--out-dir").map(PathBuf::from);
    let emits_code = rustc_option(rest, "--emit").is_some_and(|e| e.contains("link") || e.contains("obj"));
    let (Some(crate_name), Some(out_dir), true, true) = (crate_name, out_dir, primary, emits_code) else {
        return run(Path::new(rustc), rest);
    };
    let mut with_temps = rest.to_vec();
    with_temps.extend(["-C".to_string(), "save-temps".to_string()]);
    let code = run(Path::new(rustc), &with_temps)?;
    if code != 0 {
        return Ok(code);
    }
    let keep = std::env::var_os(KEEP_ENV)
        .map(PathBuf::from)
        .ok_or("no directory for kept objects")?;
    let prefix = format!("{crate_name}{}.", extra_filename(rest));
    let (units, temps) = save_temps(&out_dir, &prefix)?;
    let cwd = std::env::current_dir().map_err(|e| format!("no current directory: {e}"))?;
    let source = rest
        .iter()
        .find(|a| a.ends_with(".rs") && !a.starts_with('-'))
        .cloned()
        .unwrap_or_default();
    let kept = keep.join(format!("{crate_name}.rust.o"));
    merge_objects(&units, &kept)?;
    for t in temps {
        let _ = std::fs::remove_file(t);
    }
    let compile = Compile {
        compiler: PathBuf::from(rustc),
        cwd,
        common: rest.to_vec(),
        source,
        object: out_dir.join(format!("{crate_name}.rust.o")),
        kept,
        plain: None,
        rust: true,
        env: std::env::vars()
            .filter(|(k, _)| k.starts_with("CARGO_") || k == "OUT_DIR")
            .collect(),
    };
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(log)
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let mut text = serde_json::to_string(&compile).map_err(|e| e.to_string())?;
    text.push('\n');
    file.write_all(text.as_bytes())
        .map_err(|e| format!("{}: {e}", log.display()))?;
    Ok(0)
}

/// The codegen-unit objects rustc's `-C save-temps` left in `dir` for the
/// crate whose files start with `prefix`, and every temporary file of it.
pub fn save_temps(dir: &Path, prefix: &str) -> Result<(Vec<PathBuf>, Vec<PathBuf>), String> {
    let mut objects = Vec::new();
    let mut temps = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.starts_with(prefix) || !name.contains(".rcgu.") {
            continue;
        }
        if name.ends_with(".rcgu.o") {
            objects.push(path.clone());
        }
        temps.push(path);
    }
    objects.sort();
    if objects.is_empty() {
        return Err(format!(
            "rustc left no codegen units ({prefix}*.rcgu.o) in {}",
            dir.display()
        ));
    }
    Ok((objects, temps))
}

/// One relocatable object of several (`ld -r`): a crate's codegen units,
/// so that a function moved between units by the fix is still found.
pub fn merge_objects(objects: &[PathBuf], out: &Path) -> Result<(), String> {
    let status = Command::new("ld")
        .arg("-r")
        .arg("-o")
        .arg(out)
        .args(objects)
        .status()
        .map_err(|e| format!("cannot run ld: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "ld -r of {} objects into {} failed",
            objects.len(),
            out.display()
        ))
    }
}

/// A file name for the kept object of `source` (or of an object) that is
/// the same in both trees: its path below the tree, with `/` spelled `__`.
fn kept_name(source: &Path) -> String {
    let text = source.display().to_string();
    let below = ["/orig/", "/fixed/", "/patch/"]
        .iter()
        .find_map(|m| text.split_once(m).map(|(_, rest)| rest.to_string()))
        .unwrap_or(text);
    below.replace('/', "__")
}

/// Read a wrapper log.
pub fn read_log(path: &Path) -> Result<Vec<Compile>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("{} line {}: {e}", path.display(), i + 1)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn a_compile_line() {
        let l = parse(&args("-O2 -I inc -DX=1 -c src/a.c -o obj/a.o -MF obj/a.d"));
        assert!(l.compile_only);
        assert_eq!(l.sources, vec!["src/a.c"]);
        assert_eq!(l.output.as_deref(), Some("obj/a.o"));
        assert_eq!(l.common, args("-O2 -I inc -DX=1 -MF obj/a.d"));
    }

    #[test]
    fn a_compile_and_link_line() {
        let l = parse(&args("-O2 -pthread -o prog a.c b.cc -lm"));
        assert!(!l.compile_only);
        assert_eq!(l.sources, vec!["a.c", "b.cc"]);
        assert_eq!(l.common, args("-O2 -pthread -lm"));
    }

    #[test]
    fn a_value_that_looks_like_a_source_is_not_one() {
        let l = parse(&args("-include pre.c -x c -c a.c"));
        assert_eq!(l.sources, vec!["a.c"]);
    }

    #[test]
    fn preprocessing_makes_no_object() {
        assert!(parse(&args("-E a.c")).no_object);
        assert!(parse(&args("-S a.c")).no_object);
    }

    #[test]
    fn kept_names_agree_between_trees() {
        assert_eq!(
            kept_name(Path::new("/tmp/x/orig/src/a.c")),
            kept_name(Path::new("/tmp/x/fixed/src/a.c"))
        );
        assert_eq!(kept_name(Path::new("/tmp/x/orig/src/a.c")), "src__a.c");
    }
}
