//! Audit records of `apply` and `revert` for the system log.
//!
//! One record per action and outcome, sent as one RFC 3164 datagram to
//! the log socket (`/dev/log`, read by journald or rsyslog; the policy's
//! `audit_socket` may name another), facility `authpriv`:
//!
//! ```text
//! <85>Dec  3 08:12:01 hotpatch[4242]: action=apply result=ok uid=0 sudo_user=alice
//!     pid=1234 exe=/usr/sbin/nginx image=/usr/sbin/nginx image_build_id=3bb3…
//!     patch=/srv/fix.so sha256=9f86… signer=release patch_id=2
//! ```
//!
//! (one line). Every value is `key=value`; a value with anything but
//! letters, digits and `._/:@+,-` is quoted, with `"` and `\` escaped and
//! every other byte outside printable ASCII written `\xNN`, so a path or a
//! message can never forge another field or another line. Values are cut
//! at [`MAX_VALUE`] bytes. Unknown values are `-`.
//!
//! Formatting is pure; [`send`] is the edge: a non-blocking datagram that
//! never waits for a slow or absent log daemon.

use std::fmt::Write as _;
use std::path::Path;

/// The longest value written (an error message may name a 1 MiB symbol).
pub const MAX_VALUE: usize = 1024;

/// `LOG_AUTHPRIV`.
const FACILITY: u8 = 10;
const NOTICE: u8 = 5;
const WARNING: u8 = 4;

/// How an action ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Refused by the policy before anything touched the process.
    Refused(String),
    Failed(String),
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// `apply` or `revert`.
    pub action: &'static str,
    pub outcome: Outcome,
    /// The real uid of the tool, and its effective uid.
    pub uid: u32,
    pub euid: u32,
    /// `SUDO_USER`, if set.
    pub sudo_user: Option<String>,
    /// The target process and its executable.
    pub pid: i32,
    pub exe: Option<String>,
    /// The patched image and its GNU build-id.
    pub image: Option<String>,
    pub image_build_id: Option<String>,
    /// The patch file, its SHA-256 and signer.
    pub patch: Option<String>,
    pub sha256: Option<String>,
    pub signer: Option<String>,
    /// The patch id in the process (as `list` shows it), or `all`.
    pub patch_id: Option<String>,
}

impl Record {
    pub fn new(action: &'static str, pid: i32) -> Record {
        Record {
            action,
            outcome: Outcome::Ok,
            uid: 0,
            euid: 0,
            sudo_user: None,
            pid,
            exe: None,
            image: None,
            image_build_id: None,
            patch: None,
            sha256: None,
            signer: None,
            patch_id: None,
        }
    }

    /// A record of `action` on `pid` by this tool: its uids, `SUDO_USER`,
    /// and the target's executable (read from `/proc/PID/exe`).
    pub fn now(action: &'static str, pid: i32) -> Record {
        Record {
            uid: nix::unistd::getuid().as_raw(),
            euid: nix::unistd::geteuid().as_raw(),
            sudo_user: std::env::var_os("SUDO_USER").map(|s| s.to_string_lossy().into_owned()),
            exe: std::fs::read_link(format!("/proc/{pid}/exe"))
                .ok()
                .map(|p| p.to_string_lossy().into_owned()),
            ..Record::new(action, pid)
        }
    }

    /// Fill the patch fields from the record `list` shows.
    pub fn with_patch(mut self, p: &crate::state::PatchRecord) -> Record {
        self.patch = Some(p.path.clone());
        self.image = Some(p.image.clone());
        self.image_build_id = p.image_build_id.clone();
        self.sha256 = p.sha256.clone();
        self.signer = p.signer.clone();
        self.patch_id = Some(p.id.to_string());
        self
    }

    /// The message: `key=value` fields, one line.
    pub fn message(&self) -> String {
        let (result, error) = match &self.outcome {
            Outcome::Ok => ("ok", None),
            Outcome::Refused(e) => ("refused", Some(e.as_str())),
            Outcome::Failed(e) => ("failed", Some(e.as_str())),
        };
        let uid = self.uid.to_string();
        let euid = self.euid.to_string();
        let pid = self.pid.to_string();
        let mut fields: Vec<(&str, Option<&str>)> = vec![
            ("action", Some(self.action)),
            ("result", Some(result)),
            ("uid", Some(&uid)),
        ];
        if self.euid != self.uid {
            fields.push(("euid", Some(&euid)));
        }
        fields.extend([
            ("sudo_user", self.sudo_user.as_deref()),
            ("pid", Some(pid.as_str())),
            ("exe", self.exe.as_deref()),
            ("image", self.image.as_deref()),
            ("image_build_id", self.image_build_id.as_deref()),
            ("patch", self.patch.as_deref()),
            ("sha256", self.sha256.as_deref()),
            ("signer", self.signer.as_deref()),
            ("patch_id", self.patch_id.as_deref()),
        ]);
        if let Some(e) = error {
            fields.push(("error", Some(e)));
        }
        let mut out = String::new();
        for (i, (key, value)) in fields.into_iter().enumerate() {
            if i > 0 {
                out.push(' ');
            }
            out.push_str(key);
            out.push('=');
            quote_into(&mut out, value);
        }
        out
    }

    /// The syslog priority: `authpriv.notice`, `authpriv.warning` if the
    /// action did not succeed.
    pub fn priority(&self) -> u8 {
        FACILITY * 8
            + match self.outcome {
                Outcome::Ok => NOTICE,
                _ => WARNING,
            }
    }

    /// The RFC 3164 datagram: `<PRI>TIMESTAMP hotpatch[TOOL-PID]: MESSAGE`.
    /// `timestamp` is local time as `Mmm dd hh:mm:ss` (see [`timestamp`]).
    pub fn datagram(&self, timestamp: &str, tool_pid: u32) -> Vec<u8> {
        format!(
            "<{}>{timestamp} hotpatch[{tool_pid}]: {}",
            self.priority(),
            self.message()
        )
        .into_bytes()
    }
}

/// Whether `c` may stand unquoted in a value.
fn plain(c: char) -> bool {
    c.is_ascii_alphanumeric() || "._/:@+,-".contains(c)
}

fn quote_into(out: &mut String, value: Option<&str>) {
    let Some(value) = value else {
        out.push('-');
        return;
    };
    let (value, cut) = match value.char_indices().nth(MAX_VALUE) {
        Some((i, _)) => (&value[..i], true),
        None => (value, false),
    };
    if !value.is_empty() && value != "-" && !cut && value.chars().all(plain) {
        out.push_str(value);
        return;
    }
    out.push('"');
    for b in value.bytes() {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
    if cut {
        out.push_str("...");
    }
    out.push('"');
}

/// RFC 3164's timestamp of `secs` since the epoch, in the local time zone.
pub fn timestamp(secs: i64) -> String {
    let t: libc::time_t = secs;
    // SAFETY: `tm` is plain data, filled by localtime_r; both pointers are
    // valid for the call.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return "Jan  1 00:00:00".into();
        }
        tm
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.get(tm.tm_mon as usize).copied().unwrap_or("Jan");
    format!(
        "{month} {:>2} {:02}:{:02}:{:02}",
        tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec
    )
}

/// Send `datagram` to the datagram socket at `socket`, without blocking:
/// a log daemon that is absent or too slow is an error for the caller to
/// report, never a wait.
pub fn send(socket: &Path, datagram: &[u8]) -> std::io::Result<()> {
    let s = std::os::unix::net::UnixDatagram::unbound()?;
    s.set_nonblocking(true)?;
    s.send_to(datagram, socket)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record() -> Record {
        Record {
            outcome: Outcome::Ok,
            uid: 0,
            euid: 0,
            sudo_user: Some("alice".into()),
            exe: Some("/usr/sbin/nginx".into()),
            image: Some("/usr/sbin/nginx".into()),
            image_build_id: Some("3bb3".into()),
            patch: Some("/srv/fix.so".into()),
            sha256: Some("9f86".into()),
            signer: Some("release".into()),
            patch_id: Some("2".into()),
            ..Record::new("apply", 1234)
        }
    }

    #[test]
    fn message_fields() {
        assert_eq!(
            record().message(),
            "action=apply result=ok uid=0 sudo_user=alice pid=1234 exe=/usr/sbin/nginx \
             image=/usr/sbin/nginx image_build_id=3bb3 patch=/srv/fix.so sha256=9f86 \
             signer=release patch_id=2"
        );
        let r = Record {
            outcome: Outcome::Refused("not signed".into()),
            uid: 1000,
            sudo_user: None,
            signer: None,
            ..record()
        };
        let m = r.message();
        assert!(
            m.starts_with("action=apply result=refused uid=1000 euid=0 sudo_user=- "),
            "{m}"
        );
        assert!(m.ends_with(" signer=- patch_id=2 error=\"not signed\""), "{m}");
        assert_eq!(r.priority(), 84);
        assert_eq!(record().priority(), 85);
    }

    #[test]
    fn values_cannot_forge_fields_or_lines() {
        let r = Record {
            exe: Some("/tmp/x result=ok\n<13>evil \"q\" \\ é".into()),
            ..record()
        };
        let m = r.message();
        assert!(
            m.contains(r#"exe="/tmp/x result=ok\x0a<13>evil \"q\" \\ \xc3\xa9""#),
            "{m}"
        );
        let r = Record {
            outcome: Outcome::Failed("x".repeat(5000)),
            ..record()
        };
        assert!(r.message().len() < MAX_VALUE + 400);
        assert!(r.message().ends_with("...\""));
    }

    #[test]
    fn datagram_is_rfc3164() {
        let d = String::from_utf8(record().datagram("Dec  3 08:12:01", 42)).unwrap();
        assert!(
            d.starts_with("<85>Dec  3 08:12:01 hotpatch[42]: action=apply "),
            "{d}"
        );
        let t = timestamp(0);
        assert_eq!(t.len(), 15, "{t:?}");
    }

    #[test]
    fn send_to_a_socket_and_to_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        send(&path, b"hello").unwrap();
        let mut buf = [0u8; 16];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert!(send(&dir.path().join("none"), b"x").is_err());
    }

    proptest! {
        /// Whatever the values, the message is one line of printable ASCII.
        #[test]
        fn one_printable_line(exe in any::<String>(), err in any::<String>()) {
            let r = Record { exe: Some(exe), outcome: Outcome::Failed(err), ..record() };
            let m = r.message();
            prop_assert!(m.bytes().all(|b| (0x20..=0x7e).contains(&b)), "{m:?}");
        }
    }
}
