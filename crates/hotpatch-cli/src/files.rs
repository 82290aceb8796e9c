//! Writing a file the tool produces (a prepared image, a signed patch)
//! without ever changing the file that was there.

use anyhow::{Context, Result, bail};
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Put `data` at `path` with permission bits `mode` without ever changing
/// the file that was there: write a new file beside it (created
/// exclusively), flush it to disk, and rename it over `path`. A process
/// that maps the old file keeps the old inode (truncating it in place
/// would kill such a process with SIGBUS). `path` must be absent or a
/// regular file; on any error nothing at `path` changed.
pub fn replace_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_file() => bail!(
            "{}: not a regular file ({}); nothing written",
            path.display(),
            hotpatch::image::file::kind_name(&meta.file_type())
        ),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("{}: cannot inspect", path.display())),
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file name", path.display()))?;
    let mut temp = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("{}: cannot create a file there", dir.display()))?;
    let temp_path = temp.path().to_path_buf();
    let step = |what: &str| {
        format!(
            "{}: cannot {what}; {} unchanged",
            temp_path.display(),
            path.display()
        )
    };
    temp.write_all(data).with_context(|| step("write"))?;
    temp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
        .with_context(|| step("set permissions"))?;
    temp.as_file().sync_all().with_context(|| step("flush to disk"))?;
    temp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot rename {} over {}", temp_path.display(), path.display()))?;
    // The rename itself reaches the disk with the directory.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
