//! Every process of the host: the ones that map a patch's target image,
//! found by build-id through each process's own mappings (so processes in
//! other mount and pid namespaces, containers, are found too), applied or
//! reverted in parallel with one outcome per process.
//!
//! A process is never half-counted: it is applied, already applied
//! (skipped, the same patch's record is complete in it), skipped with a
//! reason (excluded by the policy, another build of the image, exited
//! meanwhile, not patchable and why), or failed with the engine's error
//! (which says what the engine left in it: nothing, or a record to revert).

use super::{Applied, ApplyOptions, EngineError, Reverted, Which, apply_file, list, revert};
use crate::image::ImageFile;
use crate::patchfile::{PatchSpec, TargetImage};
use crate::policy::Approved;
use crate::policy::exclude::Exclusions;
use crate::process::identity::ProcessIdentity;
use crate::process::{ProcessError, maps};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// What happened in one process.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HostOutcome {
    #[serde(flatten)]
    pub process: ProcessIdentity,
    /// The target image as the process maps it.
    pub image: Option<String>,
    #[serde(flatten)]
    pub result: HostResult,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum HostResult {
    Applied {
        applied: Box<Applied>,
    },
    /// A complete record of the same patch (same SHA-256) is in it.
    AlreadyApplied {
        patch_id: u32,
    },
    Reverted {
        reverted: Vec<Reverted>,
    },
    Skipped {
        reason: String,
    },
    Failed {
        error: String,
    },
}

impl HostResult {
    /// Failed, as opposed to done or deliberately left alone.
    pub fn is_failure(&self) -> bool {
        matches!(self, HostResult::Failed { .. })
    }
}

/// Counts of a run, for progress lines and the summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Tally {
    pub done: usize,
    pub total: usize,
    pub applied: usize,
    pub already: usize,
    pub reverted: usize,
    pub skipped: usize,
    pub failed: usize,
}

impl Tally {
    pub fn of(outcomes: &[HostOutcome]) -> Tally {
        let mut t = Tally {
            total: outcomes.len(),
            ..Tally::default()
        };
        for o in outcomes {
            t.count(&o.result);
        }
        t
    }

    fn count(&mut self, r: &HostResult) {
        self.done += 1;
        match r {
            HostResult::Applied { .. } => self.applied += 1,
            HostResult::AlreadyApplied { .. } => self.already += 1,
            HostResult::Reverted { .. } => self.reverted += 1,
            HostResult::Skipped { .. } => self.skipped += 1,
            HostResult::Failed { .. } => self.failed += 1,
        }
    }
}

/// The pids of the host's processes, other than this one, ascending.
pub fn host_pids() -> Result<Vec<i32>, EngineError> {
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
    Ok(pids)
}

/// What identifies an image file: its build-id and soname.
#[derive(Debug, Clone)]
struct ImageId {
    build_id: Option<String>,
    soname: Option<String>,
}

/// Device, inode, size and change time: one file, unchanged.
type FileKey = (u64, u64, u64, i64);

/// The [`ImageId`] of each file, read once per file however many
/// processes map it.
#[derive(Default)]
struct BuildIds {
    known: HashMap<FileKey, Option<ImageId>>,
}

impl BuildIds {
    /// The ids of the image `m`, or `None` if unreadable.
    fn of(&mut self, m: &maps::MappedImage) -> Option<ImageId> {
        let meta = std::fs::metadata(&m.open_path).ok()?;
        let key = (meta.dev(), meta.ino(), meta.size(), meta.ctime());
        self.known
            .entry(key)
            .or_insert_with(|| {
                ImageFile::open(&m.path, &m.open_path).ok().map(|i| ImageId {
                    build_id: i.build_id_hex(),
                    soname: i.soname().map(str::to_string),
                })
            })
            .clone()
    }
}

/// A process found mapping the target, or one left out and why.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub process: ProcessIdentity,
    pub image: String,
    /// `None`: to be applied.
    pub skip: Option<String>,
}

/// The target image of a patch with the build-id `--all` matches by; an
/// error when the patch names none.
pub fn wanted_target(patch: &Approved, options: &ApplyOptions) -> Result<(TargetImage, String), EngineError> {
    let file = patch.file();
    let spec = PatchSpec::from_file(file, &options.records)?;
    let refuse = |why: &str| EngineError::NotForEveryProcess {
        patch: file.path().display().to_string(),
        why: why.to_string(),
    };
    let target = spec.target.ok_or_else(|| {
        refuse("it names no target image (HOTPATCH_TARGET(image, build-id)); processes are matched by the image's build-id")
    })?;
    let build_id = target.build_id.clone().ok_or_else(|| {
        refuse("its HOTPATCH_TARGET gives no build-id, and processes are matched by build-id, not by name (`readelf -n IMAGE` shows it; `hotpatch build` records it)")
    })?;
    Ok((target, build_id))
}

/// Every process of the host that maps an image with `build_id`, and the
/// ones mapping another build of an image of the same name (skipped: the
/// operator should know they are not patched). Excluded processes are
/// listed with the policy's reason.
pub fn find_candidates(
    target: &TargetImage,
    build_id: &str,
    exclusions: &Exclusions,
) -> Result<Vec<Candidate>, EngineError> {
    let mut ids = BuildIds::default();
    let file_name = |p: &str| p.rsplit('/').next().unwrap_or(p).to_string();
    let wanted_name = file_name(&target.image);
    let mut out = Vec::new();
    for pid in host_pids()? {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
            continue;
        };
        let Ok(entries) = maps::parse(&text) else {
            continue;
        };
        let mut hit: Option<(String, Option<String>)> = None;
        for m in maps::images(&entries, pid).iter().filter(|m| m.executable) {
            let Some(ImageId { build_id: id, soname }) = ids.of(m) else {
                continue;
            };
            if id.as_deref() == Some(build_id) {
                hit = Some((m.path.clone(), None));
                break;
            }
            let same_name =
                file_name(&m.path) == wanted_name || soname.as_deref() == Some(target.image.as_str());
            if same_name && hit.is_none() {
                hit = Some((
                    m.path.clone(),
                    Some(format!(
                        "another build of the image: build-id {}, the patch is for {build_id}",
                        id.as_deref().unwrap_or("none")
                    )),
                ));
            }
        }
        let Some((image, other_build)) = hit else { continue };
        let Some(process) = ProcessIdentity::read(pid) else {
            continue;
        };
        let skip = other_build.or_else(|| exclusions.excludes(&process));
        out.push(Candidate { process, image, skip });
    }
    Ok(out)
}

/// Run `work` on each item with `jobs` threads; results in item order.
/// `progress` hears each result as it comes.
fn in_parallel<T: Sync>(
    items: &[T],
    jobs: usize,
    work: impl Fn(&T) -> HostOutcome + Sync,
    progress: &(dyn Fn(&Tally) + Sync),
) -> Vec<HostOutcome> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<HostOutcome>>> = Mutex::new(vec![None; items.len()]);
    let tally = Mutex::new(Tally {
        total: items.len(),
        ..Tally::default()
    });
    std::thread::scope(|s| {
        for _ in 0..jobs.clamp(1, items.len().max(1)) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let outcome = work(item);
                    if let Ok(mut t) = tally.lock() {
                        t.count(&outcome.result);
                        progress(&t);
                    }
                    if let Ok(mut r) = results.lock()
                        && let Some(slot) = r.get_mut(i)
                    {
                        *slot = Some(outcome);
                    }
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .flatten()
        .collect()
}

/// Why an engine error is a skip (the process left, or cannot be patched
/// at all) rather than a failure.
fn skip_reason(e: &EngineError) -> Option<String> {
    match e {
        EngineError::Exited { .. } | EngineError::Process(ProcessError::NoSuchProcess { .. }) => {
            Some("exited meanwhile".into())
        }
        EngineError::Process(ProcessError::NotPatchable { reasons, .. }) => {
            Some(format!("not patchable: {reasons}"))
        }
        _ => None,
    }
}

/// Apply `patch` to every candidate not skipped, `jobs` at a time. A
/// process that already holds a complete record of the same patch (by
/// SHA-256) is left as it is.
pub fn apply_to_all(
    patch: &Approved,
    options: &ApplyOptions,
    candidates: Vec<Candidate>,
    jobs: usize,
    progress: &(dyn Fn(&Tally) + Sync),
) -> Vec<HostOutcome> {
    let sha = patch.file().sha256_hex();
    in_parallel(
        &candidates,
        jobs,
        |c| {
            let result = match &c.skip {
                Some(reason) => HostResult::Skipped {
                    reason: reason.clone(),
                },
                None => apply_one(c, patch, &sha, options),
            };
            HostOutcome {
                process: c.process.clone(),
                image: Some(c.image.clone()),
                result,
            }
        },
        progress,
    )
}

fn apply_one(c: &Candidate, patch: &Approved, sha: &str, options: &ApplyOptions) -> HostResult {
    let pid = c.process.pid;
    match list(pid) {
        Ok(state) => {
            let same = state
                .patches
                .iter()
                .rev()
                .find(|p| p.sha256.as_deref() == Some(sha));
            if let Some(p) = same {
                return if p.complete {
                    HostResult::AlreadyApplied { patch_id: p.id }
                } else {
                    HostResult::Failed {
                        error: format!(
                            "process {pid}: an earlier apply of this patch (patch {}) did not complete; `hotpatch revert {pid} {}` first",
                            p.id, p.id
                        ),
                    }
                };
            }
        }
        Err(e) => {
            return match skip_reason(&e) {
                Some(reason) => HostResult::Skipped { reason },
                None => HostResult::Failed { error: e.to_string() },
            };
        }
    }
    let options = ApplyOptions {
        mapped_image: Some(c.image.clone()),
        ..options.clone()
    };
    match apply_file(pid, patch, &options) {
        Ok(applied) => HostResult::Applied {
            applied: Box::new(applied),
        },
        Err(e) => match skip_reason(&e) {
            Some(reason) => HostResult::Skipped { reason },
            None => HostResult::Failed {
                error: format!("{e:#}"),
            },
        },
    }
}

/// Revert, in every process that holds it, each patch whose SHA-256 is
/// `sha256` (newest first), `jobs` processes at a time. Processes without
/// it are not listed.
pub fn revert_everywhere(
    sha256: &str,
    jobs: usize,
    progress: &(dyn Fn(&Tally) + Sync),
) -> Result<Vec<HostOutcome>, EngineError> {
    let marker = format!("/memfd:{}", crate::state::MEMFD_NAME);
    let mut holders: Vec<(ProcessIdentity, Vec<u32>)> = Vec::new();
    for pid in host_pids()? {
        let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
            continue;
        };
        if !maps.contains(&marker) {
            continue;
        }
        let Ok(state) = list(pid) else { continue };
        let mut ids: Vec<u32> = state
            .patches
            .iter()
            .filter(|p| p.sha256.as_deref() == Some(sha256))
            .map(|p| p.id)
            .collect();
        if ids.is_empty() {
            continue;
        }
        ids.sort_unstable_by(|a, b| b.cmp(a));
        if let Some(process) = ProcessIdentity::read(pid) {
            holders.push((process, ids));
        }
    }
    Ok(in_parallel(
        &holders,
        jobs,
        |(process, ids)| {
            let mut reverted = Vec::new();
            let mut failure = None;
            for id in ids {
                match revert(process.pid, Which::Patch(*id)) {
                    Ok(r) => reverted.extend(r.reverted),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            let result = match failure {
                None => HostResult::Reverted { reverted },
                Some(e) => match skip_reason(&e) {
                    Some(reason) if reverted.is_empty() => HostResult::Skipped { reason },
                    _ => HostResult::Failed {
                        error: format!("{e:#}"),
                    },
                },
            };
            HostOutcome {
                process: process.clone(),
                image: None,
                result,
            }
        },
        progress,
    ))
}
