//! `/proc/PID/maps`: parsing (pure) and finding the mapped ELF images.

use std::path::PathBuf;

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub readable: bool,
    pub writable: bool,
    pub executable: bool,
    pub private: bool,
    pub offset: u64,
    pub inode: u64,
    /// The path or pseudo-path (`[heap]`, `[vdso]`), without ` (deleted)`.
    pub path: Option<String>,
    /// The mapped file was deleted (replaced by a package upgrade, say).
    pub deleted: bool,
}

impl MapEntry {
    /// A regular file, not `[heap]`, `[stack]`, `[vdso]`, anonymous memory…
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.path.as_deref().is_some_and(|p| p.starts_with('/'))
    }
}

/// Parse the text of a maps file. On error: the 1-based line and what is wrong.
pub fn parse(text: &str) -> Result<Vec<MapEntry>, (usize, String)> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| parse_line(l).map_err(|what| (i + 1, what)))
        .collect()
}

fn parse_line(line: &str) -> Result<MapEntry, String> {
    let mut fields = line.splitn(6, ' ');
    let mut next = |what: &str| {
        fields
            .next()
            .filter(|f| !f.is_empty())
            .ok_or(format!("missing {what}"))
    };
    let range = next("address range")?;
    let perms = next("permissions")?.as_bytes();
    let offset = next("offset")?;
    let _dev = next("device")?;
    let inode = next("inode")?;
    let path = fields.next().map(str::trim_start).filter(|p| !p.is_empty());
    let hex = |s: &str, what: &str| u64::from_str_radix(s, 16).map_err(|_| format!("bad {what} {s:?}"));
    let (start, end) = range
        .split_once('-')
        .ok_or(format!("bad address range {range:?}"))?;
    if perms.len() != 4 {
        return Err(format!("bad permissions {:?}", String::from_utf8_lossy(perms)));
    }
    let (path, deleted) = match path {
        Some(p) => match p.strip_suffix(" (deleted)") {
            Some(p) => (Some(p.to_string()), true),
            None => (Some(p.to_string()), false),
        },
        None => (None, false),
    };
    Ok(MapEntry {
        start: hex(start, "start address")?,
        end: hex(end, "end address")?,
        readable: perms[0] == b'r',
        writable: perms[1] == b'w',
        executable: perms[2] == b'x',
        private: perms[3] == b'p',
        offset: hex(offset, "offset")?,
        inode: inode.parse().map_err(|_| format!("bad inode {inode:?}"))?,
        path,
        deleted,
    })
}

/// A file mapped by a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedImage {
    /// The path as the process sees it.
    pub path: String,
    /// A path this process can open for the same file: through
    /// `/proc/PID/root` (other mount namespaces), or `/proc/PID/map_files`
    /// when the file was deleted.
    pub open_path: PathBuf,
    /// Start of the mapping of file offset 0.
    pub base: u64,
    pub executable: bool,
}

/// Files mapped from offset 0, once each (by inode and path), in address
/// order. Whether each is ELF is for the caller to find out.
pub fn images(maps: &[MapEntry], pid: i32) -> Vec<MappedImage> {
    let mut out: Vec<MappedImage> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for m in maps.iter().filter(|m| m.is_file() && m.offset == 0) {
        let Some(path) = m.path.clone() else { continue };
        if !seen.insert((m.inode, path.clone())) {
            continue;
        }
        let executable = maps
            .iter()
            .any(|o| o.inode == m.inode && o.path.as_deref() == Some(&path) && o.executable);
        let open_path = if m.deleted {
            PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end))
        } else {
            PathBuf::from(format!("/proc/{pid}/root{path}"))
        };
        out.push(MappedImage {
            path,
            open_path,
            base: m.start,
            executable,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 fe:01 1234                       /usr/bin/srv
55d0c0a01000-55d0c0a02000 r-xp 00001000 fe:01 1234                       /usr/bin/srv
55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000028000 r--p 00000000 fe:01 99                         /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000028000-7f000019d000 r-xp 00028000 fe:01 99                         /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000200000-7f0000201000 r-xp 00000000 fe:01 77                         /tmp/patch.so (deleted)
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0                          [vdso]
7ffe00000000-7ffe00021000 rw-p 00000000 00:00 0 
";

    #[test]
    fn parses_lines() {
        let maps = parse(SAMPLE).unwrap();
        assert_eq!(maps.len(), 8);
        assert_eq!(maps[1].start, 0x55d0c0a01000);
        assert!(maps[1].executable && maps[1].private && !maps[1].writable);
        assert_eq!(maps[4].offset, 0x28000);
        assert_eq!(maps[2].path.as_deref(), Some("[heap]"));
        assert!(!maps[2].is_file());
        assert!(maps[5].deleted);
        assert_eq!(maps[5].path.as_deref(), Some("/tmp/patch.so"));
        assert_eq!(maps[7].path, None);
    }

    #[test]
    fn finds_images_once() {
        let imgs = images(&parse(SAMPLE).unwrap(), 42);
        let paths: Vec<_> = imgs.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/usr/bin/srv",
                "/usr/lib/x86_64-linux-gnu/libc.so.6",
                "/tmp/patch.so"
            ]
        );
        assert_eq!(imgs[0].base, 0x55d0c0a00000);
        assert!(imgs[0].executable);
        assert_eq!(
            imgs[1].open_path,
            PathBuf::from("/proc/42/root/usr/lib/x86_64-linux-gnu/libc.so.6")
        );
        assert_eq!(
            imgs[2].open_path,
            PathBuf::from("/proc/42/map_files/7f0000200000-7f0000201000")
        );
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse("zz-10 r-xp 0 fe:01 1 /x").unwrap_err().0, 1);
        assert!(parse("1000-2000 r-xp").is_err());
        assert!(parse("1000-2000 rx 0 fe:01 1 /x").is_err());
    }
}
