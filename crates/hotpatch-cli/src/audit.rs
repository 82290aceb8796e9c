//! Sending audit records (see `hotpatch::audit`): a log socket that is
//! missing or full costs one warning on stderr, never the command.

use hotpatch::audit::{self, Record};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

static WARNED: AtomicBool = AtomicBool::new(false);

/// Send `record` to the datagram socket `socket`.
pub fn log(socket: &Path, record: &Record) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let datagram = record.datagram(&audit::timestamp(now), std::process::id());
    if let Err(e) = audit::send(socket, &datagram)
        && !WARNED.swap(true, Ordering::Relaxed)
    {
        crate::output::warn(&format!(
            "hotpatch: warning: audit record not logged ({}: {e}); is a syslog daemon running?",
            socket.display()
        ));
    }
}
