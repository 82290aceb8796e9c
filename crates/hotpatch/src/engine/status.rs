//! Every patched process on the host: the processes whose maps show the
//! tool's state record, each listed as `list` lists one.

use super::{EngineError, Listing, list_checked, process_gone};

/// One process that holds a state record.
#[derive(Debug, serde::Serialize)]
pub struct ProcessStatus {
    pub pid: i32,
    /// `/proc/PID/exe`, if readable.
    pub exe: Option<String>,
    #[serde(flatten)]
    pub listing: Option<Listing>,
    /// Why its record could not be read (it is not listed then).
    pub error: Option<String>,
}

/// The processes of the host (other than this one) whose mappings hold the
/// tool's state record, with their records and entries checked. A process
/// that exits during the scan is left out.
pub fn patched_processes() -> Result<Vec<ProcessStatus>, EngineError> {
    let own = std::process::id() as i32;
    let entries = std::fs::read_dir("/proc").map_err(|e| EngineError::Failed {
        pid: 0,
        what: format!("/proc: {e}"),
    })?;
    let mut pids: Vec<i32> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|&pid| pid != own)
        .collect();
    pids.sort_unstable();
    let marker = format!("/memfd:{}", crate::state::MEMFD_NAME);
    let mut out = Vec::new();
    for pid in pids {
        // Cheap first: only a process mapping the record is read further.
        let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
            continue;
        };
        if !maps.contains(&marker) {
            continue;
        }
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .map(|p| p.display().to_string());
        match list_checked(pid) {
            Ok(listing) => out.push(ProcessStatus {
                pid,
                exe,
                listing: Some(listing),
                error: None,
            }),
            Err(_) if process_gone(pid) => {}
            Err(e) => out.push(ProcessStatus {
                pid,
                exe,
                listing: None,
                error: Some(e.to_string()),
            }),
        }
    }
    Ok(out)
}
