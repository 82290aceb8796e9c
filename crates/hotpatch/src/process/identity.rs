//! Who a process is, for choosing processes on a whole host: its
//! executable, users and groups, control group, and its pid inside its own
//! pid namespace (a container's). Parsing is pure; [`ProcessIdentity::read`]
//! reads `/proc`.

/// A process as `--all` and the policy's exclusions see it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProcessIdentity {
    pub pid: i32,
    /// `/proc/PID/exe` (as the process's own mount namespace names it).
    pub exe: Option<String>,
    /// Real and effective user ids.
    pub uids: Vec<u32>,
    /// Real and effective group ids.
    pub gids: Vec<u32>,
    /// The control group (cgroup v2 path, or the first v1 hierarchy's):
    /// a container's scope, a systemd service's slice.
    pub cgroup: Option<String>,
    /// The pid inside the process's innermost pid namespace, when that is
    /// not the tool's (a process in a container).
    pub ns_pid: Option<i32>,
}

impl ProcessIdentity {
    /// Read the identity of `pid`; `None` if it is gone (or a kernel thread
    /// without a status).
    pub fn read(pid: i32) -> Option<ProcessIdentity> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let facts = parse_status(&status);
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .map(|p| p.display().to_string().trim_end_matches(" (deleted)").to_string());
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|t| parse_cgroup(&t));
        // Our own depth: a process in the same namespace has as many NSpid
        // entries as we do.
        let own_depth = std::fs::read_to_string("/proc/self/status")
            .map(|s| parse_status(&s).ns_pids.len())
            .unwrap_or(1);
        let ns_pid = (facts.ns_pids.len() > own_depth)
            .then(|| facts.ns_pids.last().copied())
            .flatten();
        Some(ProcessIdentity {
            pid,
            exe,
            uids: facts.uids,
            gids: facts.gids,
            cgroup,
            ns_pid,
        })
    }

    /// "pid 7 in its pid namespace, cgroup /x" for messages; empty for a
    /// process of the host's namespace.
    pub fn container_note(&self) -> String {
        match (self.ns_pid, &self.cgroup) {
            (Some(ns), Some(cg)) => format!(" (pid {ns} in its pid namespace, cgroup {cg})"),
            (Some(ns), None) => format!(" (pid {ns} in its pid namespace)"),
            _ => String::new(),
        }
    }
}

/// What `/proc/PID/status` says about users, groups and namespaces.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StatusFacts {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    /// `NSpid`: the pid in each pid namespace, outermost first.
    pub ns_pids: Vec<i32>,
}

/// Parse the lines of `/proc/PID/status` this module needs (pure).
pub fn parse_status(text: &str) -> StatusFacts {
    let mut facts = StatusFacts::default();
    let ids = |rest: &str| -> Vec<u32> {
        let mut v: Vec<u32> = rest
            .split_whitespace()
            .take(2)
            .filter_map(|w| w.parse().ok())
            .collect();
        v.dedup();
        v
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Uid:") {
            facts.uids = ids(rest);
        } else if let Some(rest) = line.strip_prefix("Gid:") {
            facts.gids = ids(rest);
        } else if let Some(rest) = line.strip_prefix("NSpid:") {
            facts.ns_pids = rest.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        }
    }
    facts
}

/// The control group of `/proc/PID/cgroup` (pure): the unified
/// hierarchy's (`0::PATH`), else the first line's path.
pub fn parse_cgroup(text: &str) -> Option<String> {
    let path_of = |line: &str| line.splitn(3, ':').nth(2).map(str::to_string);
    text.lines()
        .find(|l| l.starts_with("0::"))
        .and_then(path_of)
        .or_else(|| text.lines().next().and_then(path_of))
        .filter(|p| !p.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_ids_and_namespaces() {
        let text = "Name:\tnginx\nUid:\t33\t33\t33\t33\nGid:\t33\t0\t33\t33\nNSpid:\t4242\t7\n";
        let f = parse_status(text);
        assert_eq!(f.uids, vec![33]);
        assert_eq!(f.gids, vec![33, 0]);
        assert_eq!(f.ns_pids, vec![4242, 7]);
        assert_eq!(parse_status("garbage\nUid:\tx\n"), StatusFacts::default());
    }

    #[test]
    fn cgroup_v2_then_v1() {
        assert_eq!(
            parse_cgroup("0::/system.slice/docker-ab12.scope\n").as_deref(),
            Some("/system.slice/docker-ab12.scope")
        );
        assert_eq!(
            parse_cgroup("12:pids:/docker/ab\n1:name=systemd:/docker/ab\n0::/\n").as_deref(),
            Some("/")
        );
        assert_eq!(
            parse_cgroup("12:pids:/docker/ab\n").as_deref(),
            Some("/docker/ab")
        );
        assert_eq!(parse_cgroup(""), None);
        assert_eq!(parse_cgroup("nonsense"), None);
    }

    #[test]
    fn reads_this_process() {
        let me = ProcessIdentity::read(std::process::id() as i32).unwrap();
        assert!(me.exe.is_some());
        assert!(!me.uids.is_empty());
        assert_eq!(me.ns_pid, None);
        assert_eq!(me.container_note(), "");
    }
}
