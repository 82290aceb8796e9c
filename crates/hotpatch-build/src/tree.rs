//! The scratch directory: two copies of the source tree, the two builds
//! through the compiler wrapper, the patch compile and the link. The impure
//! edge of the builder: it copies files and runs the user's build command,
//! `patch`, the compiler and the linker.

use crate::emit::{self, Emitted, PatchUnit};
use crate::wrapper::{self, Compile};
use std::path::{Path, PathBuf};

use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("{path}: {what}")]
    Io { path: PathBuf, what: String },
    #[error("the fix does not apply to {source_dir} (patch -p{strip}):\n{output}")]
    Diff {
        source_dir: PathBuf,
        strip: u32,
        output: String,
    },
    #[error("the build command failed in the {which} copy ({dir}), exit {code}:\n{output}")]
    Build {
        which: &'static str,
        dir: PathBuf,
        code: i32,
        output: String,
    },
    #[error(
        "the {which} build compiled nothing through the wrapper: the build command must call the compiler by name (cc, gcc, clang, …) from the PATH, not by absolute path, and the tree must build from scratch"
    )]
    NothingCompiled { which: &'static str },
    #[error("{0}")]
    Units(String),
    #[error("{what} failed:\n{output}")]
    Tool { what: String, output: String },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> TreeError + '_ {
    move |e| TreeError::Io {
        path: path.to_path_buf(),
        what: e.to_string(),
    }
}

/// The scratch directory of one build.
pub struct Scratch {
    _temp: Option<tempfile::TempDir>,
    root: PathBuf,
}

/// The compiles of both builds.
pub struct Builds {
    orig_root: PathBuf,
    fixed_root: PathBuf,
    orig: Vec<Compile>,
    fixed: Vec<Compile>,
}

/// One unit's compile in each build.
#[derive(Debug, Clone)]
pub struct Pair {
    /// The object's path below its tree.
    pub key: String,
    pub orig: Compile,
    pub fixed: Compile,
}

/// What the link did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Linked {
    pub bytes: u64,
    /// Sections of the patch objects the linker dropped as unused.
    pub dropped_sections: usize,
}

impl Scratch {
    pub fn new(work: Option<&Path>) -> Result<Scratch, TreeError> {
        let (temp, root) = match work {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(io(dir))?;
                let root = dir.canonicalize().map_err(io(dir))?;
                if std::fs::read_dir(&root).map_err(io(&root))?.next().is_some() {
                    return Err(TreeError::Io {
                        path: root,
                        what: "--work must be a new or empty directory".into(),
                    });
                }
                (None, root)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("hotpatch-build-")
                    .tempdir()
                    .map_err(io(Path::new("/tmp")))?;
                let root = t.path().to_path_buf();
                (Some(t), root)
            }
        };
        let bin = root.join("bin");
        std::fs::create_dir_all(&bin).map_err(io(&bin))?;
        let me = std::env::current_exe().map_err(io(Path::new("/proc/self/exe")))?;
        for name in wrapper::COMPILERS.iter().chain([&wrapper::RUSTC_WRAPPER]) {
            let link = bin.join(name);
            std::os::unix::fs::symlink(&me, &link).map_err(io(&link))?;
        }
        for d in ["keep/orig", "keep/fixed", "patch"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(io(&p))?;
        }
        Ok(Scratch { _temp: temp, root })
    }

    /// A fixed crate compiled again by rustc for the patch (large code
    /// model, position-independent), its codegen units merged.
    fn patch_compile_rust(&self, compile: &Compile, unit: usize) -> Result<PathBuf, TreeError> {
        let out_dir = self.root.join("patch").join(format!("rust{unit}"));
        std::fs::create_dir_all(&out_dir).map_err(io(&out_dir))?;
        let mut args: Vec<String> = Vec::new();
        let mut skip = false;
        for a in &compile.common {
            if skip {
                skip = false;
                args.push(out_dir.display().to_string());
                continue;
            }
            if a == "--out-dir" {
                skip = true;
                args.push(a.clone());
            } else if a.starts_with("--out-dir=") {
                args.push(format!("--out-dir={}", out_dir.display()));
            } else {
                args.push(a.clone());
            }
        }
        for flag in ["code-model=large", "relocation-model=pic", "save-temps"] {
            args.push("-C".into());
            args.push(flag.into());
        }
        patch_compiler(compile, &args)?;
        let crate_name = compile
            .object
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".rust.o"))
            .unwrap_or_default()
            .to_string();
        let extra = compile
            .common
            .iter()
            .find_map(|a| a.strip_prefix("extra-filename="))
            .unwrap_or("");
        let (units, _) =
            wrapper::save_temps(&out_dir, &format!("{crate_name}{extra}.")).map_err(TreeError::Units)?;
        let object = self.root.join("patch").join(format!("unit{unit}.o"));
        wrapper::merge_objects(&units, &object).map_err(TreeError::Units)?;
        Ok(object)
    }

    /// Where the patch library is linked.
    pub fn library_path(&self) -> PathBuf {
        self.root.join("patch").join("patch.so")
    }

    /// Copy, fix and build both trees. The copies of `binary`, when it lies
    /// in `source`, are removed with the objects: a rule that links it
    /// straight from the sources would otherwise find it up to date and
    /// compile nothing.
    pub fn build_both(
        &self,
        source: &Path,
        diff: &Path,
        strip: u32,
        command: &str,
        binary: &Path,
    ) -> Result<Builds, TreeError> {
        let source = source.canonicalize().map_err(io(source))?;
        let diff = diff.canonicalize().map_err(io(diff))?;
        if !source.is_dir() {
            return Err(TreeError::Io {
                path: source,
                what: "--source must be a directory".into(),
            });
        }
        let orig_root = self.root.join("orig");
        let fixed_root = self.root.join("fixed");
        // A binary that cannot be resolved is not in the tree; opening it
        // reports that.
        let binary = binary.canonicalize().unwrap_or_else(|_| binary.to_path_buf());
        for dest in [&orig_root, &fixed_root] {
            copy_tree(&source, dest)?;
            if let Some(copy) = copy_of(&source, &binary, dest)
                && copy.is_file()
            {
                std::fs::remove_file(&copy).map_err(io(&copy))?;
            }
        }
        let out = Command::new("patch")
            .arg(format!("-p{strip}"))
            .args(["--batch", "--forward", "--no-backup-if-mismatch", "-i"])
            .arg(&diff)
            .current_dir(&fixed_root)
            .stdin(Stdio::null())
            .output()
            .map_err(io(Path::new("patch")))?;
        if !out.status.success() {
            return Err(TreeError::Diff {
                source_dir: source,
                strip,
                output: tail(&out.stdout, &out.stderr),
            });
        }
        let orig = self.run_build("original", &orig_root, "orig", command)?;
        let fixed = self.run_build("fixed", &fixed_root, "fixed", command)?;
        Ok(Builds {
            orig_root,
            fixed_root,
            orig,
            fixed,
        })
    }

    fn run_build(
        &self,
        which: &'static str,
        dir: &Path,
        keep: &str,
        command: &str,
    ) -> Result<Vec<Compile>, TreeError> {
        let log = self.root.join(format!("{keep}.log"));
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![self.root.join("bin")];
        dirs.extend(std::env::split_paths(&path));
        let wrapped = std::env::join_paths(dirs).map_err(|e| TreeError::Io {
            path: self.root.join("bin"),
            what: e.to_string(),
        })?;
        let out = Command::new("sh")
            .arg("-c")
            .arg(command)
            .current_dir(dir)
            .env("PATH", wrapped)
            .env(wrapper::PATH_ENV, &path)
            .env(wrapper::LOG_ENV, &log)
            .env(wrapper::KEEP_ENV, self.root.join("keep").join(keep))
            // cargo: rustc through the wrapper, in a target directory of
            // this build's own, so that everything is compiled.
            .env(
                "RUSTC_WRAPPER",
                self.root.join("bin").join(wrapper::RUSTC_WRAPPER),
            )
            .env("CARGO_TARGET_DIR", self.root.join(format!("cargo-{keep}")))
            .stdin(Stdio::null())
            .output()
            .map_err(io(Path::new("sh")))?;
        if !out.status.success() {
            return Err(TreeError::Build {
                which,
                dir: dir.to_path_buf(),
                code: out.status.code().unwrap_or(-1),
                output: tail(&out.stdout, &out.stderr),
            });
        }
        let mut compiles = wrapper::read_log(&log).map_err(TreeError::Units)?;
        // Probes of a configure script: their sources are gone.
        compiles.retain(|c| c.cwd.join(&c.source).is_file() && c.kept.is_file());
        if compiles.is_empty() {
            return Err(TreeError::NothingCompiled { which });
        }
        Ok(compiles)
    }

    /// Compile a fixed unit again, for the patch.
    pub fn patch_compile(&self, compile: &Compile, unit: usize) -> Result<PathBuf, TreeError> {
        if compile.rust {
            return self.patch_compile_rust(compile, unit);
        }
        let object = self.root.join("patch").join(format!("unit{unit}.o"));
        let mut args = compile.common.clone();
        args.extend(wrapper::SECTION_FLAGS.iter().map(|s| s.to_string()));
        // Last, so that they win over the build's own -fPIE/-fno-pic.
        args.extend(
            [
                "-fPIC",
                "-mcmodel=large",
                "-fvisibility=hidden",
                "-fno-lto",
                // The patch's own functions need no padding.
                "-fpatchable-function-entry=0",
                "-c",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        args.push(compile.source.clone());
        args.push("-o".into());
        args.push(object.display().to_string());
        patch_compiler(compile, &args)?;
        Ok(object)
    }

    /// Link the rewritten objects into the patch library at `output`.
    /// `records` gets the exported symbol to bind GOT offsets against and
    /// its distance to the GOT, from a first link, and gives the records;
    /// the second link adds them (a section that is not loaded: the layout
    /// stays the same, which is checked).
    pub fn link(
        &self,
        compiler: &Path,
        units: &[PatchUnit<'_>],
        emitted: &Emitted,
        records: impl Fn(&str, i64) -> Vec<String>,
        output: &Path,
    ) -> Result<(Linked, Vec<String>), TreeError> {
        let first = self.link_once(compiler, units, emitted, None, output)?;
        let (base, distance) = got_distance(output)?;
        let texts = records(&base, distance);
        let linked = self.link_once(compiler, units, emitted, Some(&texts), output)?;
        if got_distance(output)? != (base.clone(), distance) {
            return Err(TreeError::Tool {
                what: format!("linking {}", output.display()),
                output: "adding the records moved the GOT".into(),
            });
        }
        debug_assert_eq!(first.dropped_sections, linked.dropped_sections);
        Ok((linked, texts))
    }

    fn link_once(
        &self,
        compiler: &Path,
        units: &[PatchUnit<'_>],
        emitted: &Emitted,
        records: Option<&[String]>,
        output: &Path,
    ) -> Result<Linked, TreeError> {
        let dir = self.root.join("patch");
        let mut objects = Vec::new();
        for (i, (unit, bytes)) in units.iter().zip(&emitted.objects).enumerate() {
            let bytes = match records {
                Some(records) if i == 0 => with_records(bytes, records).map_err(|what| TreeError::Tool {
                    what: "adding the .hotpatch records".into(),
                    output: what,
                })?,
                _ => bytes.clone(),
            };
            let path = dir.join(format!("unit{}.patch.o", unit.index));
            std::fs::write(&path, bytes).map_err(io(&path))?;
            objects.push(path);
        }
        let script = dir.join("exports.map");
        std::fs::write(&script, emit::version_script()).map_err(io(&script))?;
        let out = Command::new(compiler)
            .arg("-shared")
            .arg("-o")
            .arg(output)
            .args(&objects)
            .arg("-Wl,--gc-sections")
            .arg("-Wl,--print-gc-sections")
            .arg(format!("-Wl,--version-script={}", script.display()))
            .arg("-Wl,-z,now")
            .arg("-Wl,--build-id")
            .stdin(Stdio::null())
            .output()
            .map_err(io(compiler))?;
        if !out.status.success() {
            return Err(TreeError::Tool {
                what: format!("linking {}", output.display()),
                output: tail(&out.stdout, &out.stderr),
            });
        }
        // Every section the rewrite left unbound must be gone.
        let text = String::from_utf8_lossy(&out.stderr);
        let mut dropped_sections = 0;
        for (unit, dropped) in units.iter().zip(&emitted.dropped) {
            let file = dir
                .join(format!("unit{}.patch.o", unit.index))
                .display()
                .to_string();
            let removed: std::collections::HashSet<&str> = text
                .lines()
                .filter(|l| l.contains(&format!("in file '{file}'")))
                .filter_map(|l| {
                    l.split_once("removing unused section '")
                        .and_then(|(_, r)| r.split_once('\''))
                        .map(|(s, _)| s)
                })
                .collect();
            dropped_sections += removed.len();
            if let Some(kept) = dropped.iter().find(|s| !removed.contains(s.as_str())) {
                return Err(TreeError::Tool {
                    what: format!("linking {}", output.display()),
                    output: format!(
                        "the linker kept section {kept} of {file}, which the patch does not use and whose references are not bound"
                    ),
                });
            }
        }
        let bytes = std::fs::metadata(output).map_err(io(output))?.len();
        Ok(Linked {
            bytes,
            dropped_sections,
        })
    }
}

/// The first exported replacement function of a linked patch, and the
/// GOT's distance from it.
fn got_distance(path: &Path) -> Result<(String, i64), TreeError> {
    use object::{Object, ObjectSymbol};
    let data = std::fs::read(path).map_err(io(path))?;
    let bad = |what: &str| TreeError::Tool {
        what: format!("reading the linked {}", path.display()),
        output: what.to_string(),
    };
    let file = object::File::parse(data.as_slice()).map_err(|e| bad(&e.to_string()))?;
    let mut got = None;
    let mut base: Option<(String, u64)> = None;
    for s in file.symbols() {
        let Ok(name) = s.name() else { continue };
        if name == "_GLOBAL_OFFSET_TABLE_" {
            got = Some(s.address());
        } else if name.starts_with(emit::REPLACEMENT_PREFIX)
            && s.is_global()
            && base.as_ref().is_none_or(|(b, _)| name < b.as_str())
        {
            base = Some((name.to_string(), s.address()));
        }
    }
    match (got, base) {
        (Some(got), Some((name, at))) => Ok((name, got.wrapping_sub(at) as i64)),
        // No GOT: nothing is GOT-relative.
        (None, Some((name, _))) => Ok((name, 0)),
        _ => Err(bad("no exported replacement function")),
    }
}

/// Run the compiler of `compile` (in its directory, with the environment
/// the build gave it) with `args`, for the patch.
fn patch_compiler(compile: &Compile, args: &[String]) -> Result<(), TreeError> {
    let out = Command::new(&compile.compiler)
        .args(args)
        .envs(compile.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(&compile.cwd)
        .stdin(Stdio::null())
        .output()
        .map_err(io(&compile.compiler))?;
    if out.status.success() {
        return Ok(());
    }
    Err(TreeError::Tool {
        what: format!(
            "the patch compile of {} ({})",
            compile.source,
            compile.compiler.display()
        ),
        output: tail(&out.stdout, &out.stderr),
    })
}

impl Builds {
    /// Pair each unit of the original build with the fixed build's.
    pub fn pairs(&self) -> Result<Vec<Pair>, TreeError> {
        let key = |c: &Compile, root: &Path| -> String {
            match c.object.strip_prefix(root) {
                Ok(rel) => rel.display().to_string(),
                Err(_) => c
                    .object
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            }
        };
        let mut pairs = Vec::new();
        let mut unmatched = Vec::new();
        for o in &self.orig {
            let k = key(o, &self.orig_root);
            match self.fixed.iter().find(|f| key(f, &self.fixed_root) == k) {
                Some(f) => pairs.push(Pair {
                    key: k,
                    orig: o.clone(),
                    fixed: f.clone(),
                }),
                None => unmatched.push(format!("{k} (only in the original build)")),
            }
        }
        for f in &self.fixed {
            let k = key(f, &self.fixed_root);
            if !self.orig.iter().any(|o| key(o, &self.orig_root) == k) {
                unmatched.push(format!("{k} (only in the fixed build)"));
            }
        }
        if !unmatched.is_empty() {
            return Err(TreeError::Units(format!(
                "the two builds compiled different files: {}; a fix that adds or removes a source file is not supported yet",
                unmatched.join(", ")
            )));
        }
        Ok(pairs)
    }
}

/// Copy `from` to `to` (`cp -a`), then remove objects so that the build
/// compiles every unit through the wrapper.
fn copy_tree(from: &Path, to: &Path) -> Result<(), TreeError> {
    let out = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .map_err(io(Path::new("cp")))?;
    if !out.status.success() {
        return Err(TreeError::Tool {
            what: format!("copying {} to {}", from.display(), to.display()),
            output: tail(&out.stdout, &out.stderr),
        });
    }
    remove_objects(to)
}

/// Where the copy of `file` is in `dest`, a copy of the tree `source`
/// (both paths canonical); `None` when `file` is not below `source`.
fn copy_of(source: &Path, file: &Path, dest: &Path) -> Option<PathBuf> {
    let below = file.strip_prefix(source).ok()?;
    (!below.as_os_str().is_empty()).then(|| dest.join(below))
}

fn remove_objects(dir: &Path) -> Result<(), TreeError> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io(&path))?;
        if kind.is_dir() {
            remove_objects(&path)?;
        } else if kind.is_file() && matches!(path.extension().and_then(|e| e.to_str()), Some("o" | "lo")) {
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
    }
    Ok(())
}

/// The last lines of a command's output.
fn tail(stdout: &[u8], stderr: &[u8]) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(stdout),
        String::from_utf8_lossy(stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The object with a `.hotpatch` section holding `records`.
fn with_records(object: &[u8], records: &[String]) -> Result<Vec<u8>, String> {
    use object::build::elf::{Builder, SectionData};
    let mut b = Builder::read(object).map_err(|e| e.to_string())?;
    let mut data = Vec::new();
    for r in records {
        data.extend_from_slice(b"hotpatch-v1 ");
        data.extend_from_slice(r.as_bytes());
        data.push(0);
    }
    let s = b.sections.add();
    s.name = hotpatch::patchfile::SECTION.as_bytes().to_vec().into();
    s.sh_type = object::elf::SHT_PROGBITS;
    s.sh_flags = 0;
    s.sh_addralign = 1;
    s.data = SectionData::Data(data.into());
    let mut out = Vec::new();
    b.write(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copy_of_a_binary_in_the_tree_is_at_the_same_place_below_the_copy() {
        assert_eq!(
            copy_of(
                Path::new("/src/lz4"),
                Path::new("/src/lz4/lib/liblz4.so.1.9.2"),
                Path::new("/w/orig")
            ),
            Some(PathBuf::from("/w/orig/lib/liblz4.so.1.9.2"))
        );
        assert_eq!(
            copy_of(
                Path::new("/src/lz4"),
                Path::new("/usr/lib/liblz4.so"),
                Path::new("/w/orig")
            ),
            None
        );
        assert_eq!(
            copy_of(
                Path::new("/src/lz4"),
                Path::new("/src/lz4-2/lib.so"),
                Path::new("/w/orig")
            ),
            None
        );
        assert_eq!(
            copy_of(Path::new("/src/lz4"), Path::new("/src/lz4"), Path::new("/w/orig")),
            None
        );
    }
}
