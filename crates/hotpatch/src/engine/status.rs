//! Every patched process on the host: the processes whose maps show the
//! tool's state record, each listed as `list` lists one.

use super::{EngineError, Listing, list_checked, process_gone};
use crate::process::identity::ProcessIdentity;

/// One process that holds a state record.
#[derive(Debug, serde::Serialize)]
pub struct ProcessStatus {
    /// Its pid, executable, users, cgroup, and pid in its own namespace.
    #[serde(flatten)]
    pub process: ProcessIdentity,
    #[serde(flatten)]
    pub listing: Option<Listing>,
    /// Why its record could not be read (it is not listed then).
    pub error: Option<String>,
}

/// The processes of the host (other than this one) whose mappings hold the
/// tool's state record, with their records and entries checked. A process
/// that exits during the scan is left out.
pub fn patched_processes() -> Result<Vec<ProcessStatus>, EngineError> {
    let pids = super::host::host_pids()?;
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
        let Some(process) = ProcessIdentity::read(pid) else {
            continue;
        };
        match list_checked(pid) {
            Ok(listing) => out.push(ProcessStatus {
                process,
                listing: Some(listing),
                error: None,
            }),
            Err(_) if process_gone(pid) => {}
            Err(e) => out.push(ProcessStatus {
                process,
                listing: None,
                error: Some(e.to_string()),
            }),
        }
    }
    Ok(out)
}
