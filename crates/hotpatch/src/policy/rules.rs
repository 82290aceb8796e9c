//! The policy file's rules (pure): what a patch needs to be applied.
//!
//! ```toml
//! # /etc/hotpatch/policy.toml
//! require_signature = true          # default false
//! keys_dir = "/etc/hotpatch/keys"   # trusted public keys (the default)
//! audit_socket = "/dev/log"         # where audit records go (the default)
//!
//! [exclude]                         # kept out of `apply --all` and `install`
//! executables = ["/usr/sbin/sshd"]  # see [`super::exclude`]
//! users = ["postgres"]
//! ```
//!
//! Unknown keys are an error: a misspelt `require_signature` must not
//! silently leave patches unchecked.

use serde::Deserialize;
use std::path::PathBuf;

/// Where the trusted public keys are, unless the policy or `--keys` says.
pub const DEFAULT_KEYS_DIR: &str = "/etc/hotpatch/keys";
/// The system log socket.
pub const DEFAULT_AUDIT_SOCKET: &str = "/dev/log";
/// The largest policy file read.
pub const MAX_POLICY_FILE: u64 = 64 * 1024;

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    /// Refuse a patch without a valid signature by a trusted key.
    #[serde(default)]
    pub require_signature: bool,
    /// The directory of trusted public keys (`*.pub`).
    pub keys_dir: Option<PathBuf>,
    /// The datagram socket audit records are sent to.
    pub audit_socket: Option<PathBuf>,
    /// Processes kept out of every automatic selection.
    #[serde(default)]
    pub exclude: super::exclude::Exclude,
}

impl Rules {
    pub fn parse(text: &str) -> Result<Rules, String> {
        let rules: Rules = toml::from_str(text).map_err(|e| e.message().to_string())?;
        for (what, p) in [
            ("keys_dir", &rules.keys_dir),
            ("audit_socket", &rules.audit_socket),
        ] {
            if p.as_ref().is_some_and(|p| !p.is_absolute()) {
                return Err(format!("{what} must be an absolute path"));
            }
        }
        rules.exclude.check()?;
        Ok(rules)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_file() {
        let r = Rules::parse(
            "require_signature = true\nkeys_dir = \"/etc/hotpatch/keys\"\naudit_socket = \"/run/x.sock\"\n",
        )
        .unwrap();
        assert!(r.require_signature);
        assert_eq!(
            r.keys_dir.as_deref(),
            Some(std::path::Path::new("/etc/hotpatch/keys"))
        );
        assert_eq!(
            r.audit_socket.as_deref(),
            Some(std::path::Path::new("/run/x.sock"))
        );
        assert_eq!(Rules::parse("").unwrap(), Rules::default());
    }

    #[test]
    fn refuses_unknown_keys_wrong_types_and_relative_paths() {
        for bad in [
            "require_signatures = true",
            "require_signature = \"yes\"",
            "keys_dir = \"keys\"",
            "audit_socket = \"dev/log\"",
            "require_signature = true\nrequire_signature = false",
            "[exclude]\nexecutables = [\"sshd\"]",
            "[exclude]\nuser = [\"postgres\"]",
        ] {
            assert!(Rules::parse(bad).is_err(), "{bad}");
        }
    }
}
