//! The target's libc: its functions found from its file, and the record
//! of them a session leaves in the call region for the next.

use super::*;

/// The target's libc, as mapped: its dynamic symbols and load bias.
#[derive(Debug)]
pub struct TargetLibc {
    pub path: String,
    pub bias: u64,
    symbols: DynSymbols,
}

impl TargetLibc {
    /// Find the C library mapped by `pid` (glibc `libc.so.6`, or musl's
    /// `ld-musl-*.so.1`) and read its dynamic symbols from the file.
    pub fn find(pid: i32, maps: &[MapEntry]) -> Result<TargetLibc, ProcessError> {
        Self::find_with(pid, maps, None)
    }

    /// Like [`TargetLibc::find`], knowing only the functions named in
    /// `names` ([`DynSymbols::read_names`]: 0.3 ms instead of 2.5 ms for
    /// libc's whole file under load).
    pub fn find_names(pid: i32, maps: &[MapEntry], names: &[&str]) -> Result<TargetLibc, ProcessError> {
        Self::find_with(pid, maps, Some(names))
    }

    fn find_with(pid: i32, maps: &[MapEntry], names: Option<&[&str]>) -> Result<TargetLibc, ProcessError> {
        let images = crate::process::maps::images(maps, pid);
        let libc = images
            .iter()
            .find(|i| crate::reserved::is_c_library(&i.path))
            .ok_or_else(|| ProcessError::SymbolNotFound {
                pid,
                name: "libc".into(),
                image: "the process's mappings (statically linked?)".into(),
            })?;
        let symbols = match names {
            Some(names) => DynSymbols::read_names(&libc.open_path, names),
            None => DynSymbols::read(&libc.open_path),
        }
        .map_err(|e| ProcessError::Image {
            pid,
            path: libc.open_path.clone(),
            error: Box::new(e),
        })?;
        Ok(TargetLibc {
            path: libc.path.clone(),
            bias: libc.base.wrapping_sub(symbols.link_base),
            symbols,
        })
    }

    /// The run-time address of function `name`, if libc exports it.
    pub fn function(&self, name: &str) -> Option<u64> {
        self.symbols
            .lookup(name)
            .filter(|s| s.st_type == object::elf::STT_FUNC)
            .map(|s| s.value.wrapping_add(self.bias))
    }
}

/// The libc functions a session needs on every run, recorded in the call
/// region ([`Layout::info`]) so that a later session need not read libc's
/// file (~2 MiB) again: libc does not move in a live process.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct LibcInfo {
    pub(super) path: Option<String>,
    pub(super) functions: Vec<(String, u64)>,
}

impl LibcInfo {
    const MAGIC: &'static [u8; 8] = b"HPLIBC01";
    /// The functions a record holds: those the tool calls.
    pub(super) fn names() -> Vec<&'static str> {
        crate::reserved::CALLED.iter().map(|c| c.name).collect()
    }

    pub(super) fn of(libc: Option<&TargetLibc>) -> LibcInfo {
        let Some(libc) = libc else {
            return LibcInfo::default();
        };
        LibcInfo {
            path: Some(libc.path.clone()),
            // The functions the tool calls; a patch may not replace them.
            functions: crate::reserved::CALLED
                .iter()
                .filter_map(|c| Some((c.name.to_string(), libc.function(c.name)?)))
                .collect(),
        }
    }

    pub(super) fn get(&self, name: &str) -> Option<u64> {
        self.functions.iter().find(|(n, _)| n == name).map(|&(_, a)| a)
    }

    /// The record in the region, if it holds a valid one.
    pub(super) fn read(mem: &Mem, layout: &Layout) -> Option<LibcInfo> {
        let head = mem.read(layout.info(), 12).ok()?;
        if &head[..8] != Self::MAGIC {
            return None;
        }
        let len = u32::from_le_bytes(head[8..12].try_into().ok()?) as u64;
        if len > stub::INFO_SIZE - 12 - NAME_ROOM {
            return None;
        }
        let json = mem.read(layout.info() + 12, len as usize).ok()?;
        serde_json::from_slice(&json).ok()
    }

    pub(super) fn write(&self, mem: &Mem, layout: &Layout) -> Result<(), ProcessError> {
        let json = serde_json::to_vec(self).unwrap_or_default();
        if json.len() as u64 > stub::INFO_SIZE - 12 - NAME_ROOM {
            return Ok(());
        }
        let mut bytes = Self::MAGIC.to_vec();
        bytes.extend_from_slice(&(json.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&json);
        mem.write(layout.info(), &bytes)
    }
}
