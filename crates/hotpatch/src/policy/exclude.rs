//! Processes the policy keeps out of every automatic selection (`apply
//! --all`, the install service): by executable, user or group (pure).
//!
//! ```toml
//! [exclude]
//! executables = ["/usr/sbin/sshd", "/opt/legacy/"]  # a path, or a directory ending in /
//! users = ["postgres", "1001"]                       # names or numeric ids
//! groups = ["dba"]
//! ```
//!
//! A name that does not resolve is an error, not an exclusion of nobody:
//! a misspelt user must not leave its processes patched.

use crate::process::identity::ProcessIdentity;
use serde::Deserialize;

/// The `[exclude]` table as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exclude {
    #[serde(default)]
    pub executables: Vec<String>,
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
}

/// A user or group id and the name it was given by.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Id {
    id: u32,
    given: String,
}

/// The exclusions with names resolved to ids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exclusions {
    executables: Vec<String>,
    users: Vec<Id>,
    groups: Vec<Id>,
}

impl Exclude {
    /// Check what needs no lookup: executables are absolute paths.
    pub fn check(&self) -> Result<(), String> {
        for e in &self.executables {
            if !e.starts_with('/') {
                return Err(format!("exclude.executables: `{e}` is not an absolute path"));
            }
        }
        for (what, names) in [("users", &self.users), ("groups", &self.groups)] {
            if names.iter().any(|n| n.trim().is_empty()) {
                return Err(format!("exclude.{what}: an empty name"));
            }
        }
        Ok(())
    }

    /// Resolve user and group names with `user` and `group` (numbers are
    /// taken as ids).
    pub fn resolve(
        &self,
        user: impl Fn(&str) -> Option<u32>,
        group: impl Fn(&str) -> Option<u32>,
    ) -> Result<Exclusions, String> {
        self.check()?;
        let ids = |what: &str, names: &[String], lookup: &dyn Fn(&str) -> Option<u32>| {
            names
                .iter()
                .map(|n| {
                    n.parse::<u32>()
                        .ok()
                        .or_else(|| lookup(n))
                        .map(|id| Id { id, given: n.clone() })
                        .ok_or_else(|| format!("exclude.{what}: no such {}: `{n}`", &what[..what.len() - 1]))
                })
                .collect::<Result<Vec<_>, String>>()
        };
        Ok(Exclusions {
            executables: self.executables.clone(),
            users: ids("users", &self.users, &user)?,
            groups: ids("groups", &self.groups, &group)?,
        })
    }
}

impl Exclusions {
    pub fn is_empty(&self) -> bool {
        self.executables.is_empty() && self.users.is_empty() && self.groups.is_empty()
    }

    /// Why the policy excludes `who`, or `None`.
    pub fn excludes(&self, who: &ProcessIdentity) -> Option<String> {
        if let Some(exe) = &who.exe
            && let Some(rule) = self.executables.iter().find(|r| match r.strip_suffix('/') {
                Some(dir) => exe.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/')),
                None => exe == *r,
            })
        {
            return Some(format!(
                "its executable {exe} is excluded by the policy (`{rule}`)"
            ));
        }
        if let Some(u) = self.users.iter().find(|u| who.uids.contains(&u.id)) {
            return Some(format!(
                "user {} (uid {}) is excluded by the policy",
                u.given, u.id
            ));
        }
        if let Some(g) = self.groups.iter().find(|g| who.gids.contains(&g.id)) {
            return Some(format!(
                "group {} (gid {}) is excluded by the policy",
                g.given, g.id
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(exe: &str, uid: u32, gid: u32) -> ProcessIdentity {
        ProcessIdentity {
            pid: 1,
            exe: Some(exe.into()),
            uids: vec![uid],
            gids: vec![gid],
            ..Default::default()
        }
    }

    fn lookup(name: &str) -> Option<u32> {
        match name {
            "postgres" => Some(105),
            "dba" => Some(200),
            _ => None,
        }
    }

    #[test]
    fn excludes_by_path_directory_user_and_group() {
        let e = Exclude {
            executables: vec!["/usr/sbin/sshd".into(), "/opt/legacy/".into()],
            users: vec!["postgres".into(), "1001".into()],
            groups: vec!["dba".into()],
        }
        .resolve(lookup, lookup)
        .unwrap();
        assert!(e.excludes(&who("/usr/sbin/sshd", 0, 0)).unwrap().contains("sshd"));
        assert!(e.excludes(&who("/usr/sbin/sshd2", 0, 0)).is_none());
        assert!(e.excludes(&who("/opt/legacy/bin/x", 0, 0)).is_some());
        assert!(e.excludes(&who("/opt/legacyx/bin/x", 0, 0)).is_none());
        assert!(
            e.excludes(&who("/bin/a", 105, 0))
                .unwrap()
                .contains("user postgres (uid 105)")
        );
        assert!(e.excludes(&who("/bin/a", 1001, 0)).is_some());
        assert!(e.excludes(&who("/bin/a", 0, 200)).unwrap().contains("group dba"));
        assert!(e.excludes(&who("/bin/a", 0, 0)).is_none());
        let no_exe = ProcessIdentity {
            exe: None,
            ..who("/x", 0, 0)
        };
        assert!(e.excludes(&no_exe).is_none());
    }

    #[test]
    fn unknown_names_and_relative_paths_are_errors() {
        let bad_user = Exclude {
            users: vec!["postgress".into()],
            ..Default::default()
        };
        assert!(
            bad_user
                .resolve(lookup, lookup)
                .unwrap_err()
                .contains("no such user: `postgress`")
        );
        let bad_group = Exclude {
            groups: vec!["nope".into()],
            ..Default::default()
        };
        assert!(
            bad_group
                .resolve(lookup, lookup)
                .unwrap_err()
                .contains("no such group")
        );
        let relative = Exclude {
            executables: vec!["sshd".into()],
            ..Default::default()
        };
        assert!(relative.check().is_err());
        assert!(Exclude::default().resolve(lookup, lookup).unwrap().is_empty());
    }
}
