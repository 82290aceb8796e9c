//! `hotpatch build`: a patch library from a source fix (see the
//! `hotpatch-build` crate).

use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The source tree the running binary was built from (left unchanged:
    /// the builds run in copies).
    #[arg(long)]
    source: PathBuf,
    /// The fix, a unified diff against that tree.
    #[arg(long)]
    diff: PathBuf,
    /// The command that built the binary, run by `sh -c` at the top of each
    /// copy. It must call the compiler by name (cc, gcc, clang) from PATH.
    #[arg(long = "build")]
    build_command: String,
    /// The running binary (executable or shared library) as built by that
    /// command, with its symbol table.
    #[arg(long)]
    binary: PathBuf,
    /// Where to write the patch library.
    #[arg(short, long)]
    output: PathBuf,
    /// Strip this many leading path components from the diff's file names.
    #[arg(short = 'p', long, default_value_t = 1)]
    strip: u32,
    /// Keep the scratch directory (copies, objects, logs) here.
    #[arg(long)]
    work: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let options = hotpatch_build::Options {
        source: args.source,
        diff: args.diff,
        build: args.build_command,
        binary: args.binary,
        output: args.output.clone(),
        strip: args.strip,
        work: args.work,
    };
    let built = match hotpatch_build::build(&options) {
        Ok(b) => b,
        Err(hotpatch_build::BuildError::Refused(list, report)) if args.json => {
            let text = format!("{}\n", serde_json::to_string_pretty(&report)?);
            crate::output::emit(&text, || None)?;
            anyhow::bail!(hotpatch_build::BuildError::Refused(list, report));
        }
        Err(e) => return Err(e.into()),
    };
    crate::files::replace_file(&args.output, &built.library, 0o644)?;
    let text = if args.json {
        format!("{}\n", serde_json::to_string_pretty(&built.report)?)
    } else {
        built.report.text()
    };
    crate::output::emit(&text, || Some(format!("{} WAS written", args.output.display())))?;
    Ok(())
}
