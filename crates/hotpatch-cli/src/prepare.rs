//! `hotpatch prepare FILE -o OUT`.

use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The ELF file to read (left unchanged).
    file: PathBuf,
    /// Where to write the prepared copy (may be FILE itself: the copy
    /// replaces it by a rename, so processes running it are unaffected).
    #[arg(short, long)]
    output: PathBuf,
    /// Print what was done as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let image = hotpatch::Image::open(&args.file)?;
    let copy = hotpatch::prepare::prepare(&image);
    let mode = std::fs::metadata(&args.file)
        .with_context(|| format!("{}", args.file.display()))?
        .permissions()
        .mode();
    crate::files::replace_file(&args.output, &copy.data, mode)?;
    let mut text = String::new();
    if args.json {
        writeln!(
            text,
            "{}",
            serde_json::json!({
                "input": args.file,
                "output": args.output,
                "rewritten": copy.rewritten,
            })
        )?;
    } else {
        writeln!(
            text,
            "{}: rewrote {} entries from `90 90` to `66 90`, wrote {}",
            args.file.display(),
            copy.rewritten.len(),
            args.output.display()
        )?;
    }
    crate::output::emit(&text, || Some(format!("{} WAS written", args.output.display())))?;
    Ok(())
}
