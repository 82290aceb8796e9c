//! What a recorded function's entry holds, compared with its record, and
//! what reverting a patch must write given that. Pure: the bytes found are
//! read by the caller (through a closure).
//!
//! A record says how to put an entry back (its entry's undo writes, in
//! order). From them follow the bytes of a patched entry (before the
//! first write), of the original (after the last) and of each state in
//! between (a flip interrupted by a killed tool). The entry found in the
//! process is one of those — or none: then the code changed behind the
//! record's back (another tool, the program itself, a record that is not
//! this process's) and nothing may be written over it.

use crate::image::hex;
use crate::plan::EntryFlip;
use crate::state::{FunctionRecord, State, StateError, Version, short};
use serde::Serialize;

/// Where a recorded entry is, compared with its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum EntryState {
    /// The bytes of a patched entry.
    Patched,
    /// The original bytes.
    Original,
    /// Between the two: the first `undone` writes of the way back are done
    /// (a flip or a revert interrupted).
    Partly { undone: usize },
    /// Neither: changed behind the record's back.
    Drifted,
}

/// The bytes an entry's undo covers, in its states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntrySpan {
    pub start: u64,
    /// Each state's bytes: `states[0]` patched, `states[n]` original (after
    /// the `n` undo writes); `None` where no write touches.
    pub states: Vec<Vec<Option<u8>>>,
}

impl EntrySpan {
    /// The span of `f`'s entry undo; an error if its writes contradict
    /// each other (a write expecting bytes an earlier one did not leave).
    pub fn of(f: &FunctionRecord) -> Result<EntrySpan, StateError> {
        f.check()?;
        let writes = f.entry_undo();
        let start = writes.iter().map(|w| w.address).min().unwrap_or(f.entry);
        let end = writes
            .iter()
            .map(|w| w.address.saturating_add(w.new.len() as u64))
            .max()
            .unwrap_or(f.entry);
        let len = usize::try_from(end - start)
            .ok()
            .filter(|&l| l <= 4 * crate::state::MAX_WRITE)
            .ok_or_else(|| {
                StateError::Invalid(format!(
                    "function `{}`: entry writes spread too far",
                    short(&f.name)
                ))
            })?;
        let mut current: Vec<Option<u8>> = vec![None; len];
        // The patched bytes: what each write expects where no earlier write
        // touched.
        for w in writes {
            let at = (w.address - start) as usize;
            for (i, &b) in w.expected.iter().enumerate() {
                current[at + i].get_or_insert(b);
            }
        }
        let mut states = vec![current.clone()];
        for w in writes {
            let at = (w.address - start) as usize;
            if current[at..at + w.expected.len()]
                .iter()
                .zip(&w.expected)
                .any(|(c, e)| *c != Some(*e))
            {
                return Err(StateError::Invalid(format!(
                    "function `{}` at {:#x}: its entry writes contradict each other at {:#x}",
                    short(&f.name),
                    f.entry,
                    w.address
                )));
            }
            for (i, &b) in w.new.iter().enumerate() {
                current[at + i] = Some(b);
            }
            states.push(current.clone());
        }
        Ok(EntrySpan { start, states })
    }

    pub fn len(&self) -> usize {
        self.states.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Which state `found` (the span's bytes, read now) is.
    pub fn classify(&self, found: &[u8]) -> EntryState {
        let is = |state: &[Option<u8>]| {
            found.len() == state.len() && state.iter().zip(found).all(|(s, f)| s.is_none_or(|s| s == *f))
        };
        let n = self.states.len() - 1;
        if self.states.first().is_some_and(|s| is(s)) {
            EntryState::Patched
        } else if self.states.last().is_some_and(|s| is(s)) {
            EntryState::Original
        } else if let Some(k) = (1..n).find(|&k| is(&self.states[k])) {
            EntryState::Partly { undone: k }
        } else {
            EntryState::Drifted
        }
    }

    /// A state's bytes as hex (`..` where no write touches).
    pub fn hex(&self, state: usize) -> String {
        self.states.get(state).map_or_else(String::new, |s| {
            s.iter()
                .map(|b| b.map_or_else(|| "..".to_string(), |b| format!("{b:02x}")))
                .collect()
        })
    }
}

/// One recorded function's entry, checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntryCheck {
    pub name: String,
    pub entry: u64,
    /// Where the compared bytes start.
    pub address: u64,
    #[serde(flatten)]
    pub state: EntryState,
    /// Whether the record says a patch is live on it.
    pub recorded_patched: bool,
    /// The bytes of a patched entry, of the original, and those found.
    pub patched: String,
    pub original: String,
    pub found: String,
}

impl EntryCheck {
    /// Whether the code is what the record says: patched when a patch is
    /// live on it, original (or on its way there) when none is.
    pub fn agrees(&self) -> bool {
        match self.state {
            EntryState::Patched => self.recorded_patched,
            EntryState::Original => !self.recorded_patched,
            EntryState::Partly { .. } | EntryState::Drifted => false,
        }
    }
}

/// Check `f`'s entry against `read` (address, length → the bytes now).
pub fn check_entry<E>(
    f: &FunctionRecord,
    read: &mut impl FnMut(u64, usize) -> Result<Vec<u8>, E>,
) -> Result<Result<EntryCheck, StateError>, E> {
    let span = match EntrySpan::of(f) {
        Ok(s) => s,
        Err(e) => return Ok(Err(e)),
    };
    let found = read(span.start, span.len())?;
    Ok(Ok(EntryCheck {
        name: f.name.clone(),
        entry: f.entry,
        address: span.start,
        state: span.classify(&found),
        recorded_patched: !f.versions.is_empty(),
        patched: span.hex(0),
        original: span.hex(span.states.len() - 1),
        found: hex(&found),
    }))
}

/// Why a revert cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevertRefused {
    #[error(transparent)]
    Record(#[from] StateError),
    #[error(
        "`{name}` at {address:#x}: its entry holds {found}, neither the patched bytes the record \
         holds ({patched}) nor the original ({original}); it changed behind the record's back, \
         so the revert is refused and nothing written"
    )]
    Drifted {
        name: String,
        address: u64,
        patched: String,
        original: String,
        found: String,
    },
    #[error("no patch {0} is recorded")]
    NoSuchPatch(u32),
}

/// What reverting one patch writes and records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevertPlan {
    /// Entries going back to their original bytes: (function index, the
    /// writes still to do — none if the entry already is original).
    pub restores: Vec<(usize, EntryFlip)>,
    /// Live slots stepping back to an older version: (slot, replacement).
    pub stores: Vec<(u64, u64)>,
    /// Functions left with older versions: (function index, versions).
    pub stepped_back: Vec<(usize, Vec<Version>)>,
}

/// The functions patch `id` is recorded on: those its record lists, and
/// any whose versions name it (a record whose patch entry is missing).
pub fn functions_of(state: &State, id: u32) -> Vec<usize> {
    let listed: Vec<u64> = state.patch(id).map(|p| p.functions.clone()).unwrap_or_default();
    state
        .functions
        .iter()
        .enumerate()
        .filter(|(_, f)| listed.contains(&f.entry) || f.versions.iter().any(|v| v.patch == id))
        .map(|(i, _)| i)
        .collect()
}

/// The ids `revert --all` reverts, newest first: every recorded patch,
/// and any patch a function's versions name without a patch record.
pub fn all_patches(state: &State) -> Vec<u32> {
    let mut ids: Vec<u32> = state.patches.iter().map(|p| p.id).collect();
    for f in &state.functions {
        for v in &f.versions {
            if !ids.contains(&v.patch) {
                ids.push(v.patch);
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids.reverse();
    ids
}

/// Plan the revert of patch `id`, reading each entry it goes back on
/// through `read`. Refuses — before anything is written — when an entry
/// is neither patched, original, nor between the two.
pub fn plan_revert<E>(
    state: &State,
    id: u32,
    read: &mut impl FnMut(u64, usize) -> Result<Vec<u8>, E>,
) -> Result<Result<RevertPlan, RevertRefused>, E> {
    let functions = functions_of(state, id);
    if state.patch(id).is_none() && functions.is_empty() {
        return Ok(Err(RevertRefused::NoSuchPatch(id)));
    }
    let mut plan = RevertPlan::default();
    for index in functions {
        let f = &state.functions[index];
        let was_live = f.versions.last().is_some_and(|v| v.patch == id);
        let remaining: Vec<Version> = f.versions.iter().filter(|v| v.patch != id).cloned().collect();
        let span = match EntrySpan::of(f) {
            Ok(s) => s,
            Err(e) => return Ok(Err(e.into())),
        };
        let found = read(span.start, span.len())?;
        let entry = span.classify(&found);
        if entry == EntryState::Drifted {
            return Ok(Err(RevertRefused::Drifted {
                name: short(&f.name),
                address: span.start,
                patched: span.hex(0),
                original: span.hex(span.states.len() - 1),
                found: hex(&found),
            }));
        }
        if remaining.is_empty() {
            // The entry goes back: the undo writes not done yet. The
            // route stays, dormant.
            let mut restore = f.entry_restore();
            let done = match entry {
                EntryState::Patched => 0,
                EntryState::Partly { undone } => undone,
                EntryState::Original | EntryState::Drifted => restore.writes.len(),
            };
            restore.writes.drain(..done.min(restore.writes.len()));
            plan.restores.push((index, restore));
        } else {
            if was_live && let Some(top) = remaining.last() {
                plan.stores.push((f.slot, top.replacement));
            }
            plan.stepped_back.push((index, remaining));
        }
    }
    Ok(Ok(plan))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Route, Write};
    use crate::state::{PatchRecord, ScratchRecord};
    use proptest::prelude::*;

    fn w(address: u64, expected: &[u8], new: &[u8]) -> Write {
        Write {
            address,
            expected: expected.to_vec(),
            new: new.to_vec(),
        }
    }

    /// A prepared function at 0x1006 (gcc nops): patched `eb f8`, on the
    /// way back `66 f8`… here `90 f8`, original `90 90`.
    fn prepared(versions: &[u32]) -> FunctionRecord {
        FunctionRecord {
            image: "/srv/app".into(),
            name: "f".into(),
            entry: 0x1006,
            slot: 0x9000,
            route: Route::Prepared,
            undo: vec![
                w(0x1006, &[0xeb], &[0x90]),
                w(0x1007, &[0xf8], &[0x90]),
                w(0x1000, &[0xff, 0x25, 0, 0, 0, 0], &[0x90; 6]),
            ],
            live_safe: true,
            versions: versions
                .iter()
                .map(|&patch| Version {
                    patch,
                    replacement: 0x7000 + u64::from(patch),
                })
                .collect(),
            original: 0x1008,
        }
    }

    fn detoured(versions: &[u32]) -> FunctionRecord {
        FunctionRecord {
            entry: 0x2000,
            name: "g".into(),
            route: Route::Detour {
                patch_at: 0x2000,
                displaced: 7,
            },
            undo: vec![w(0x2000, &[0xe9, 1, 2, 3, 4], &[0x55, 0x48, 0x89, 0xe5, 0x53])],
            live_safe: false,
            ..prepared(versions)
        }
    }

    fn state_with(functions: Vec<FunctionRecord>, patches: &[u32]) -> State {
        State {
            next_patch_id: 9,
            patches: patches
                .iter()
                .map(|&id| PatchRecord {
                    id,
                    path: "/p.so".into(),
                    build_id: None,
                    image: "/srv/app".into(),
                    image_build_id: None,
                    applied_at: 0,
                    functions: functions.iter().map(|f| f.entry).collect(),
                    handle: 1,
                    sha256: None,
                    signer: None,
                    complete: true,
                })
                .collect(),
            functions,
            scratch: vec![ScratchRecord {
                base: 0x9000,
                size: 0x1000,
                used: 0x100,
                executable: false,
            }],
        }
    }

    fn reader(bytes: Vec<(u64, Vec<u8>)>) -> impl FnMut(u64, usize) -> Result<Vec<u8>, String> {
        move |addr, len| {
            bytes
                .iter()
                .find(|(a, b)| *a <= addr && addr + len as u64 <= a + b.len() as u64)
                .map(|(a, b)| b[(addr - a) as usize..(addr - a) as usize + len].to_vec())
                .ok_or_else(|| format!("unmapped {addr:#x}"))
        }
    }

    #[test]
    fn entries_classify_as_patched_original_partly_or_drifted() {
        let span = EntrySpan::of(&prepared(&[1])).unwrap();
        assert_eq!(span.start, 0x1006);
        assert_eq!(
            (span.hex(0), span.hex(2)),
            ("ebf8".to_string(), "9090".to_string())
        );
        assert_eq!(span.classify(&[0xeb, 0xf8]), EntryState::Patched);
        assert_eq!(span.classify(&[0x90, 0xf8]), EntryState::Partly { undone: 1 });
        assert_eq!(span.classify(&[0x90, 0x90]), EntryState::Original);
        assert_eq!(span.classify(&[0xcc, 0x90]), EntryState::Drifted);
        assert_eq!(span.classify(&[0xeb]), EntryState::Drifted);
        let span = EntrySpan::of(&detoured(&[1])).unwrap();
        assert_eq!(span.classify(&[0xe9, 1, 2, 3, 4]), EntryState::Patched);
        assert_eq!(span.classify(&[0xe9, 1, 2, 3, 5]), EntryState::Drifted);
    }

    #[test]
    fn contradicting_writes_are_refused() {
        let mut f = prepared(&[1]);
        f.undo[1] = w(0x1006, &[0xeb], &[0x90]); // expects what the first undid
        assert!(matches!(EntrySpan::of(&f), Err(StateError::Invalid(_))));
    }

    #[test]
    fn revert_writes_what_is_left_and_refuses_drift() {
        let state = state_with(vec![prepared(&[1]), detoured(&[1])], &[1]);
        let mem = |f: &[u8], g: &[u8]| reader(vec![(0x1006, f.to_vec()), (0x2000, g.to_vec())]);
        let plan = plan_revert(&state, 1, &mut mem(&[0xeb, 0xf8], &[0xe9, 1, 2, 3, 4]))
            .unwrap()
            .unwrap();
        assert_eq!(plan.restores.len(), 2);
        assert_eq!(plan.restores[0].1.writes.len(), 2);
        assert_eq!(plan.restores[1].1.writes.len(), 1);
        // Half reverted, and already original: only what is left.
        let plan = plan_revert(
            &state,
            1,
            &mut mem(&[0x90, 0xf8], &[0x55, 0x48, 0x89, 0xe5, 0x53]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(plan.restores[0].1.writes, vec![w(0x1007, &[0xf8], &[0x90])]);
        assert!(plan.restores[1].1.writes.is_empty());
        // Changed behind the record's back.
        let refused = plan_revert(&state, 1, &mut mem(&[0xeb, 0xf8], &[0xe8, 0, 0, 0, 0]))
            .unwrap()
            .unwrap_err();
        let msg = refused.to_string();
        assert!(
            msg.contains("`g` at 0x2000") && msg.contains("e800000000"),
            "{msg}"
        );
        assert!(msg.contains("e901020304") && msg.contains("554889e553"), "{msg}");
    }

    #[test]
    fn older_versions_step_back_and_orphans_are_found() {
        let mut state = state_with(vec![prepared(&[1, 2])], &[1, 2]);
        let mut mem = reader(vec![(0x1006, vec![0xeb, 0xf8])]);
        let plan = plan_revert(&state, 2, &mut mem).unwrap().unwrap();
        assert_eq!(plan.stores, vec![(0x9000, 0x7001)]);
        assert!(plan.restores.is_empty());
        // A version whose patch has no record is still reverted by --all.
        state.patches.clear();
        assert_eq!(all_patches(&state), vec![2, 1]);
        assert_eq!(functions_of(&state, 2), vec![0]);
        assert_eq!(
            plan_revert(&state, 7, &mut mem).unwrap(),
            Err(RevertRefused::NoSuchPatch(7))
        );
    }

    fn arb_write() -> impl Strategy<Value = Write> {
        let address = || prop_oneof![any::<u64>(), 0x0ff0u64..0x1030, 0x1ff0u64..0x2030];
        prop_oneof![
            // Lengths that agree (what the tool writes), bytes anything.
            3 => (address(), 1usize..6).prop_flat_map(|(address, len)| {
                (
                    prop::collection::vec(0x8fu8..0x92, len),
                    prop::collection::vec(0x8fu8..0x92, len),
                )
                    .prop_map(move |(expected, new)| Write {
                        address,
                        expected,
                        new,
                    })
            }),
            1 => (
                address(),
                prop::collection::vec(any::<u8>(), 0..8),
                prop::collection::vec(any::<u8>(), 0..8),
            )
                .prop_map(|(address, expected, new)| Write {
                    address,
                    expected,
                    new,
                }),
        ]
    }

    fn arb_function() -> impl Strategy<Value = FunctionRecord> {
        (
            prop_oneof![any::<u64>(), Just(0x1006u64), Just(0x2000u64)],
            prop_oneof![
                Just(Route::Prepared),
                (any::<u64>(), any::<u64>())
                    .prop_map(|(patch_at, displaced)| Route::Detour { patch_at, displaced }),
                (0x1ff0u64..0x2010, 0u64..40)
                    .prop_map(|(patch_at, displaced)| Route::Detour { patch_at, displaced }),
            ],
            prop::collection::vec(arb_write(), 0..5),
            prop::collection::vec((0u32..5, any::<u64>()), 0..4),
            any::<bool>(),
            prop_oneof![(0x9000u64..0xa010).prop_map(|s| s & !7), any::<u64>()],
        )
            .prop_map(|(entry, route, undo, versions, live_safe, slot)| FunctionRecord {
                image: "i".into(),
                name: "f".into(),
                entry,
                slot,
                route,
                undo,
                live_safe,
                versions: versions
                    .into_iter()
                    .map(|(patch, replacement)| Version { patch, replacement })
                    .collect(),
                original: 0,
            })
    }

    fn arb_state() -> impl Strategy<Value = State> {
        (
            prop::collection::vec(arb_function(), 0..5),
            prop::collection::vec(0u32..5, 0..4),
            prop::collection::vec((any::<u64>(), any::<u64>(), any::<u64>()), 0..3),
            any::<u32>(),
        )
            .prop_map(|(functions, ids, scratch, next)| {
                let mut s = state_with(functions, &ids);
                s.next_patch_id = next;
                s.scratch = s
                    .scratch
                    .iter()
                    .cloned()
                    .chain(scratch.into_iter().map(|(base, size, used)| ScratchRecord {
                        base,
                        size,
                        used,
                        executable: base & 1 == 1,
                    }))
                    .collect();
                s
            })
    }

    /// Everything list and revert plan from a record, on whatever a record
    /// holds and whatever the memory holds.
    fn plan_everything(state: &State, memory: &[u8]) -> usize {
        let _ = state.check();
        let mut planned = 0;
        let mut read = |addr: u64, len: usize| -> Result<Vec<u8>, ()> {
            if len > 4096 {
                return Err(());
            }
            Ok((0..len)
                .map(|i| memory[(addr as usize).wrapping_add(i) % memory.len().max(1)])
                .collect())
        };
        for f in &state.functions {
            let _ = check_entry(f, &mut read);
            let _ = f.entry_restore();
        }
        for id in all_patches(state).into_iter().chain([0, u32::MAX]) {
            if let Ok(Ok(_)) = plan_revert(state, id, &mut read) {
                planned += 1;
            }
        }
        planned
    }

    /// The generator reaches records that plan (not only refusals).
    #[test]
    fn generated_records_often_plan() {
        use proptest::strategy::ValueTree;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let memory: Vec<u8> = (0..64).map(|i| 0x8f + (i % 3) as u8).collect();
        let planned: usize = (0..2000)
            .map(|_| {
                let state = arb_state().new_tree(&mut runner).unwrap().current();
                plan_everything(&state, &memory)
            })
            .sum();
        assert!(planned > 20, "only {planned} plans");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Arbitrary records: checking, listing and planning a revert
        /// never panic.
        #[test]
        fn arbitrary_records_never_panic(
            state in arb_state(),
            memory in prop::collection::vec(any::<u8>(), 1..64),
        ) {
            plan_everything(&state, &memory);
        }

        /// Arbitrary or mutated bytes in the state region: reading never
        /// panics, nor does planning from whatever it decodes.
        #[test]
        fn mutated_regions_never_panic(
            state in arb_state(),
            flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..16),
            memory in prop::collection::vec(any::<u8>(), 1..64),
        ) {
            let mut region = crate::state::init(8192).unwrap();
            let (_, cursor) = crate::state::decode(&region).unwrap();
            if let Ok((writes, _)) = crate::state::encode(region.len(), cursor, &state) {
                for (o, b) in writes {
                    region[o..o + b.len()].copy_from_slice(&b);
                }
            }
            let len = region.len();
            for (at, b) in flips {
                region[at % len] = b;
            }
            if let Ok((decoded, _)) = crate::state::decode(&region) {
                plan_everything(&decoded, &memory);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(region in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = crate::state::decode(&region);
        }
    }
}
