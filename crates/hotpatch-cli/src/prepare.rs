//! `hotpatch prepare FILE -o OUT`.

use anyhow::{Context, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The ELF file to read (left unchanged).
    file: PathBuf,
    /// Where to write the prepared copy.
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
    std::fs::write(&args.output, &copy.data)
        .with_context(|| format!("{}: cannot write", args.output.display()))?;
    std::fs::set_permissions(&args.output, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("{}: cannot set permissions", args.output.display()))?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "input": args.file,
                "output": args.output,
                "rewritten": copy.rewritten,
            })
        );
    } else {
        println!(
            "{}: rewrote {} entries from `90 90` to `66 90`, wrote {}",
            args.file.display(),
            copy.rewritten.len(),
            args.output.display()
        );
    }
    Ok(())
}
