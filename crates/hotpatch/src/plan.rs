//! From a target image, a patch and where things landed in the process, to
//! the exact byte writes that flip each function — each with the bytes it
//! expects to replace. Pure: addresses in, writes out.
//!
//! Order (DESIGN.md §2): for every function of the patch, first the slot,
//! the trampoline if any, and the padding (nobody executes those yet); then
//! the entries, one byte at a time. Revert is the mirror image.

use crate::arch::x86_64::entry::MAX_PADDING;
use crate::arch::x86_64::{FlipPlan, LongJump, jump, relocate};
use crate::image::suggestion::hint;
use crate::image::{Function, Image, ImageFile, LookupError, SymbolIndex, SymbolKind, SymbolMatch};
use crate::patchability::{
    Class, Entry, branch_targets, branch_targets_into, classify_detour, classify_entry, padding_only, survey,
};
use crate::shorten::name as short;
use std::cell::{OnceCell, RefCell};

/// One compare-and-swap write into the target.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Write {
    pub address: u64,
    pub expected: Vec<u8>,
    pub new: Vec<u8>,
}

impl Write {
    /// The same write undone.
    pub fn inverse(&self) -> Write {
        Write {
            address: self.address,
            expected: self.new.clone(),
            new: self.expected.clone(),
        }
    }
}

/// Scratch memory for one function, within ±2 GiB of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scratch {
    /// An 8-byte, 8-aligned slot in a data page.
    pub slot: u64,
    /// 8 bytes of executable memory, for a [`LongJump::Trampoline`] plan.
    pub trampoline: Option<u64>,
}

/// A byte range an entry flip overwrites. A thread may be at its start
/// (the new jump is there) but never strictly inside it when the bytes
/// change: it would resume in the middle of the new instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Overwrite {
    pub start: u64,
    pub len: u64,
}

impl Overwrite {
    pub fn contains(&self, address: u64) -> bool {
        address > self.start && address < self.start.saturating_add(self.len)
    }
}

/// How a function's calls reach its replacement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Route {
    /// Built with padding: a 2-byte short jump into a long jump before the
    /// entry (DESIGN.md §2).
    #[default]
    Prepared,
    /// Unprepared: a 5-byte jump at `patch_at` over `displaced` bytes of
    /// whole instructions, which a trampoline runs instead (DESIGN.md §3).
    Detour { patch_at: u64, displaced: u64 },
}

impl Route {
    pub fn name(&self) -> &'static str {
        match self {
            Route::Prepared => "prepared",
            Route::Detour { .. } => "detour",
        }
    }

    /// How many writes change the entry: two single bytes, or one jump.
    pub fn entry_writes(&self) -> usize {
        match self {
            Route::Prepared => 2,
            Route::Detour { .. } => 1,
        }
    }
}

/// The writes that switch a function's entry, and how they may be done.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EntryFlip {
    /// In order: two single bytes (prepared) or one 5-byte jump (detour).
    pub writes: Vec<Write>,
    /// Where no thread may resume when the writes are done stopped.
    pub overwrite: Overwrite,
    /// Whether the writes are proven safe with threads running, one at a
    /// time; else every thread is stopped for them.
    pub live_safe: bool,
}

impl EntryFlip {
    /// The flip undone: the inverse writes, in reverse order.
    pub fn inverse(&self) -> EntryFlip {
        EntryFlip {
            writes: self.writes.iter().rev().map(Write::inverse).collect(),
            overwrite: self.overwrite,
            live_safe: self.live_safe,
        }
    }
}

/// How one function is flipped to its replacement.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FunctionFlip {
    /// The target function's name, as the patch named it.
    pub name: String,
    /// Its entry in the process.
    pub entry: u64,
    pub route: Route,
    pub slot: u64,
    /// The replacement's address in the process, stored in the slot.
    pub replacement: u64,
    /// Writes before the entry flips, into memory no thread runs yet: the
    /// slot first, then trampoline, dispatcher or padding.
    pub prepare: Vec<Write>,
    pub entry_flip: EntryFlip,
    /// Where the original code can be called while the function is patched:
    /// just past the entry nops (prepared), or the trampoline (detour).
    pub original: u64,
}

/// Why a function cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error("{}: `{}` is a variable, not a function", short(image), short(name))]
    NotAFunction { image: String, name: String },
    #[error("{}: `{}` cannot be patched: {detail}", short(image), short(name))]
    NotPatchable {
        image: String,
        name: String,
        detail: String,
    },
    #[error("{}: {detail}", short(image))]
    Read { image: String, detail: String },
    #[error("{}: {functions}; nothing was changed", short(image))]
    UsedByTheTool { image: String, functions: String },
    #[error("{}: `{}`: {detail}", short(image), short(name))]
    OutOfRange {
        image: String,
        name: String,
        detail: String,
    },
}

/// Target names → functions and how to patch them, for one image.
///
/// [`Planner::new`] surveys a whole parsed [`Image`] and indexes all its
/// symbols once (for callers that have one). [`Planner::lean`] works on an
/// [`ImageFile`] and reads only what the names asked about need: their
/// symbols, the functions around them, the padded sites; only a function
/// without usable padding (a detour) makes it read and decode the whole
/// code, for the branches into the function.
pub struct Planner<'a> {
    source: Source<'a>,
}

enum Source<'a> {
    Whole {
        image: &'a Image,
        symbols: SymbolIndex,
        classes: std::collections::HashMap<u64, Class>,
    },
    Lean {
        file: &'a ImageFile,
        found: RefCell<std::collections::HashMap<String, Result<SymbolMatch, LookupError>>>,
        sites: OnceCell<Vec<u64>>,
        /// The whole image's direct branch targets, sorted.
        targets: OnceCell<Vec<u64>>,
        /// The functions near the names found at the start (merged
        /// windows, and the functions in them, sorted), read in one pass.
        near: OnceCell<(Vec<std::ops::Range<u64>>, Vec<Function>)>,
    },
}

impl<'a> Planner<'a> {
    pub fn new(image: &'a Image) -> Planner<'a> {
        let classes = survey(image)
            .functions
            .into_iter()
            .map(|f| (f.address, f.class))
            .collect();
        Planner {
            source: Source::Whole {
                image,
                symbols: SymbolIndex::new(image),
                classes,
            },
        }
    }

    /// A planner for `file` that finds `names` (the names a patch uses)
    /// in one pass over each symbol table; other names are found when
    /// asked for.
    pub fn lean(file: &'a ImageFile, names: &[&str]) -> Result<Planner<'a>, PlanError> {
        let planner = Planner {
            source: Source::Lean {
                file,
                found: RefCell::default(),
                sites: OnceCell::new(),
                targets: OnceCell::new(),
                near: OnceCell::new(),
            },
        };
        planner.find_all(names)?;
        planner.read_near()?;
        Ok(planner)
    }

    /// Read the functions near every function found so far, in one pass
    /// over the symbol tables (not one per function).
    fn read_near(&self) -> Result<(), PlanError> {
        let Source::Lean {
            file, found, near, ..
        } = &self.source
        else {
            return Ok(());
        };
        let windows: Vec<std::ops::Range<u64>> = found
            .borrow()
            .values()
            .filter_map(|r| r.as_ref().ok())
            .filter(|m| m.kind == SymbolKind::Function)
            .map(|m| near_window(m.address))
            .collect();
        if windows.is_empty() {
            return Ok(());
        }
        let functions = file
            .functions_in_windows(&windows)
            .map_err(|e| self.read_error(e))?;
        let _ = near.set((crate::image::merge_windows(&windows), functions));
        Ok(())
    }

    /// The functions whose entries lie in `window`: from what
    /// [`Planner::read_near`] read if that covers it, else read now.
    fn functions_in(
        &self,
        file: &ImageFile,
        window: std::ops::Range<u64>,
    ) -> Result<std::borrow::Cow<'_, [Function]>, PlanError> {
        if let Source::Lean { near, .. } = &self.source
            && let Some((windows, functions)) = near.get()
            && let Some(w) = windows.get(windows.partition_point(|w| w.end < window.end))
            && w.start <= window.start
            && window.end <= w.end
        {
            let from = functions.partition_point(|f| f.address < window.start);
            let to = functions.partition_point(|f| f.address < window.end);
            return Ok(std::borrow::Cow::Borrowed(&functions[from..to]));
        }
        file.functions_in(window)
            .map(std::borrow::Cow::Owned)
            .map_err(|e| self.read_error(e))
    }

    /// The image's path, for messages.
    pub fn path(&self) -> &std::path::Path {
        match &self.source {
            Source::Whole { image, .. } => image.path(),
            Source::Lean { file, .. } => file.path(),
        }
    }

    fn image_name(&self) -> String {
        self.path().display().to_string()
    }

    /// A name not found, with what it may have meant: near names, other
    /// forms, clones, inlining (reads all the image's symbol names and its
    /// debug info: the error path only).
    fn hinted(&self, e: LookupError) -> LookupError {
        e.with_hint(|query| match &self.source {
            Source::Whole { image, .. } => {
                let names: Vec<SymbolMatch> = crate::image::lookup::symbols(image);
                hint(query, names.iter().map(|s| s.name.as_str()), |s| {
                    image.section_data(s)
                })
            }
            Source::Lean { file, .. } => {
                let names = file.symbol_names().unwrap_or_default();
                hint(query, names.iter().map(String::as_str), |s| file.section_bytes(s))
            }
        })
    }

    fn read_error(&self, e: crate::image::ImageError) -> PlanError {
        PlanError::Read {
            image: self.image_name(),
            detail: e.to_string(),
        }
    }

    fn find_all(&self, names: &[&str]) -> Result<(), PlanError> {
        let Source::Lean { file, found, .. } = &self.source else {
            return Ok(());
        };
        let mut missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !found.borrow().contains_key(*n))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        let results = file.find_symbols(&missing).map_err(|e| self.read_error(e))?;
        let mut found = found.borrow_mut();
        for (name, result) in missing.iter().zip(results) {
            found.insert(name.to_string(), result);
        }
        Ok(())
    }

    /// The symbol `name` (see [`SymbolIndex::find`]).
    pub fn symbol(&self, name: &str) -> Result<SymbolMatch, PlanError> {
        match &self.source {
            Source::Whole { symbols, .. } => Ok(symbols.find(name).map_err(|e| self.hinted(e))?),
            Source::Lean { found, .. } => {
                self.find_all(&[name])?;
                let result = found.borrow().get(name).cloned();
                match result {
                    Some(r) => Ok(r.map_err(|e| self.hinted(e))?),
                    None => Err(PlanError::Read {
                        image: self.image_name(),
                        detail: format!("`{}` was not looked up", short(name)),
                    }),
                }
            }
        }
    }

    fn bytes_at(&self, address: u64, len: u64) -> Option<&[u8]> {
        match &self.source {
            Source::Whole { image, .. } => image.bytes_at(address, len),
            Source::Lean { file, .. } => file.bytes_at(address, len),
        }
    }

    /// The function `name` and its class.
    pub fn function(&self, name: &str) -> Result<(u64, Class), PlanError> {
        let sym = self.symbol(name)?;
        if sym.kind != SymbolKind::Function {
            return Err(PlanError::NotAFunction {
                image: self.image_name(),
                name: name.to_string(),
            });
        }
        let class = match &self.source {
            Source::Whole { classes, .. } => classes.get(&sym.address).cloned(),
            Source::Lean { .. } => self.lean_class(sym.address)?,
        };
        let class = class.ok_or_else(|| PlanError::NotPatchable {
            image: self.image_name(),
            name: name.to_string(),
            detail: format!("no function starts at {:#x}", sym.address),
        })?;
        Ok((sym.address, class))
    }

    /// The class [`survey`] gives the function at `address`, from the
    /// symbols near it, its padded site and its bytes (and, for a detour
    /// only, the whole image's branches).
    fn lean_class(&self, address: u64) -> Result<Option<Class>, PlanError> {
        let Source::Lean {
            file, sites, targets, ..
        } = &self.source
        else {
            return Ok(None);
        };
        // Every function whose entry could share the padding before
        // `address` or lie in the bytes a detour would overwrite.
        let near = self.functions_in(file, near_window(address))?;
        let Some(f) = near.iter().find(|f| f.address == address) else {
            return Ok(None);
        };
        let entries: Vec<u64> = near.iter().map(|f| f.address).collect();
        let sites = match sites.get() {
            Some(s) => s,
            None => {
                let read = file.padded_sites().map_err(|e| self.read_error(e))?;
                sites.get_or_init(|| read)
            }
        };
        // As `survey` maps them: a site belongs to the first entry at or
        // after it, within reach and over padding only; the last such wins.
        let from = address.saturating_sub(MAX_PADDING);
        let site = sites[sites.partition_point(|&s| s < from)..]
            .iter()
            .take_while(|&&s| s <= address)
            .copied()
            .filter(|&s| {
                entries.get(entries.partition_point(|&a| a < s)) == Some(&address)
                    && padding_only(*file, s, address)
            })
            .last();
        let (detour, note) = match classify_entry(*file, f, site) {
            Entry::Done(class) => return Ok(Some(class)),
            Entry::Detour { detour, note } => (detour, note),
        };
        // Only branches to the entry and into the bytes the jump replaces.
        let window = address..detour.patch_at.saturating_add(detour.displaced);
        let into = self.branches_into(file, sites, window)?;
        let targets: &[u64] = match &into {
            Some(t) => t,
            None => match targets.get() {
                Some(t) => t,
                None => {
                    let whole = file.read_whole().map_err(|e| self.read_error(e))?;
                    let t = branch_targets(&whole);
                    targets.get_or_init(|| t)
                }
            },
        };
        let name_at = |a: u64| {
            near.iter()
                .find(|g| g.address == a)
                .map(|g| g.name().display().to_string())
        };
        Ok(Some(classify_detour(f, detour, note, targets, &entries, name_at)))
    }

    /// The image's direct branch targets in `window` (see
    /// [`crate::patchability::branch_targets_into`]); `None` when only a
    /// decode of the whole code can tell.
    fn branches_into(
        &self,
        file: &ImageFile,
        sites: &[u64],
        window: std::ops::Range<u64>,
    ) -> Result<Option<Vec<u64>>, PlanError> {
        let mut starts = file.function_entries().map_err(|e| self.read_error(e))?;
        starts.extend_from_slice(sites);
        starts.sort_unstable();
        starts.dedup();
        let ranges = file.code_ranges().map_err(|e| self.read_error(e))?;
        // A range that cannot be read now (the file changed since its
        // headers were read) sends the caller to the whole-image path,
        // which reports the error.
        let code = file.code_reader();
        Ok(branch_targets_into(&ranges, &starts, window, |address, buf| {
            code.read(address, buf)
        }))
    }

    /// Resolve `name` to a function and how to patch it (file addresses).
    pub fn method(&self, name: &str) -> Result<(u64, Method), PlanError> {
        let (address, class) = self.function(name)?;
        match class {
            Class::Prepared { flip, .. } => Ok((address, Method::Prepared(flip))),
            Class::Detourable {
                detour, direct_calls, ..
            } => {
                let len = detour.patch_at - address + detour.displaced;
                let code = self
                    .bytes_at(address, len)
                    .ok_or_else(|| PlanError::NotPatchable {
                        image: self.image_name(),
                        name: name.to_string(),
                        detail: format!("{len} bytes at {address:#x} are not in the file"),
                    })?
                    .to_vec();
                Ok((
                    address,
                    Method::Detour {
                        detour,
                        code,
                        direct_calls,
                    },
                ))
            }
            Class::NotPatchable { detail, .. } => Err(PlanError::NotPatchable {
                image: self.image_name(),
                name: name.to_string(),
                detail,
            }),
        }
    }
}

/// Every function whose entry could share the padding before `address`
/// or lie in the bytes a detour would overwrite.
fn near_window(address: u64) -> std::ops::Range<u64> {
    address.saturating_sub(MAX_PADDING)..address.saturating_add(MAX_PADDING)
}

/// How one function of an image is patched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// Through its padding.
    Prepared(FlipPlan),
    /// With a detour.
    Detour {
        detour: crate::arch::x86_64::Detour,
        /// The function's bytes from its entry to the end of the displaced
        /// instructions, as in the file.
        code: Vec<u8>,
        /// Direct calls and jumps to it from its own image (the
        /// register-allocation hazard; see [`Class::Detourable`]).
        direct_calls: usize,
    },
}

/// The writes that make `flip` (file addresses of `image_name`, loaded at `bias`)
/// jump to `replacement` through `scratch`. `slot_live` says the slot
/// already holds a live pointer (then it is not written here: a live slot
/// changes with one atomic store inside the target).
pub fn flip_writes(
    name: &str,
    image_name: &str,
    bias: u64,
    flip: &FlipPlan,
    replacement: u64,
    scratch: Scratch,
) -> Result<FunctionFlip, PlanError> {
    let out_of_range = |detail: String| PlanError::OutOfRange {
        image: image_name.to_string(),
        name: name.to_string(),
        detail,
    };
    let at = |file_address: u64| file_address.wrapping_add(bias);
    let long_jump_at = at(flip.long_jump_at);
    let short_jump_at = at(flip.short_jump_at);
    let mut prepare = vec![Write {
        address: scratch.slot,
        expected: vec![0; 8],
        new: replacement.to_le_bytes().to_vec(),
    }];
    let padding_new: Vec<u8> = match flip.long_jump {
        LongJump::Slot => jump::slot_jump(long_jump_at, scratch.slot)
            .map_err(|e| out_of_range(e.to_string()))?
            .to_vec(),
        LongJump::Trampoline => {
            let trampoline = scratch
                .trampoline
                .ok_or_else(|| out_of_range("the plan needs a trampoline and none was given".into()))?;
            let bytes = jump::slot_jump(trampoline, scratch.slot).map_err(|e| out_of_range(e.to_string()))?;
            prepare.push(Write {
                address: trampoline,
                expected: vec![0; bytes.len()],
                new: bytes.to_vec(),
            });
            jump::near_jump(long_jump_at, trampoline)
                .map_err(|e| out_of_range(e.to_string()))?
                .to_vec()
        }
    };
    prepare.push(Write {
        address: long_jump_at,
        expected: vec![crate::arch::x86_64::entry::NOP; padding_new.len()],
        new: padding_new,
    });
    let first = flip.first_byte;
    let second = 1 - first;
    let writes = [first, second]
        .iter()
        .map(|&i| Write {
            address: short_jump_at + i as u64,
            expected: vec![flip.original[i]],
            new: vec![flip.short_jump[i]],
        })
        .collect();
    Ok(FunctionFlip {
        name: name.to_string(),
        entry: short_jump_at,
        route: Route::Prepared,
        slot: scratch.slot,
        replacement,
        prepare,
        entry_flip: EntryFlip {
            writes,
            overwrite: Overwrite {
                start: short_jump_at,
                len: 2,
            },
            live_safe: flip.live_safe(),
        },
        original: short_jump_at + 2,
    })
}

/// Scratch memory for one detoured function, within ±2 GiB of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DetourScratch {
    /// An 8-byte slot in a data page.
    pub slot: u64,
    /// 8 bytes of code: `jmp [slot]`, where the entry's `jmp rel32` lands.
    pub dispatcher: u64,
    /// [`relocate::TRAMPOLINE_SIZE`] bytes of code for the moved instructions.
    pub trampoline: u64,
}

/// A function of an image loaded at `bias`, as the patch names it.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub name: &'a str,
    pub image: &'a str,
    pub bias: u64,
    /// The function's entry, as a file address.
    pub entry: u64,
}

/// The writes that detour the unprepared function `detour` describes to
/// `replacement`. `code` are the function's bytes from its entry (at least
/// up to the end of the displaced instructions).
pub fn detour_writes(
    subject: Subject<'_>,
    detour: &crate::arch::x86_64::Detour,
    code: &[u8],
    replacement: u64,
    scratch: DetourScratch,
) -> Result<FunctionFlip, PlanError> {
    let Subject {
        name,
        image: image_name,
        bias,
        entry,
    } = subject;
    let fail = |detail: String| PlanError::OutOfRange {
        image: image_name.to_string(),
        name: name.to_string(),
        detail,
    };
    let skip = (detour.patch_at - entry) as usize;
    let moved = code
        .get(skip..skip + detour.displaced as usize)
        .ok_or_else(|| fail("the function's bytes end before the displaced instructions".into()))?;
    let patch_at = detour.patch_at.wrapping_add(bias);
    let trampoline =
        relocate::relocate(patch_at, moved, scratch.trampoline).map_err(|e| fail(e.to_string()))?;
    let dispatcher = jump::slot_jump(scratch.dispatcher, scratch.slot).map_err(|e| fail(e.to_string()))?;
    let jump = jump::near_jump(patch_at, scratch.dispatcher).map_err(|e| fail(e.to_string()))?;
    Ok(FunctionFlip {
        name: name.to_string(),
        entry: entry.wrapping_add(bias),
        route: Route::Detour {
            patch_at,
            displaced: detour.displaced,
        },
        slot: scratch.slot,
        replacement,
        prepare: vec![
            Write {
                address: scratch.slot,
                expected: vec![0; 8],
                new: replacement.to_le_bytes().to_vec(),
            },
            Write {
                address: scratch.dispatcher,
                expected: vec![0; dispatcher.len()],
                new: dispatcher.to_vec(),
            },
            Write {
                address: scratch.trampoline,
                expected: vec![0; trampoline.len()],
                new: trampoline,
            },
        ],
        entry_flip: EntryFlip {
            writes: vec![Write {
                address: patch_at,
                expected: moved[..jump.len()].to_vec(),
                new: jump.to_vec(),
            }],
            overwrite: Overwrite {
                start: patch_at,
                len: detour.displaced,
            },
            live_safe: false,
        },
        original: scratch.trampoline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::{decode_one, plan_flip, recognize_prepared};
    use iced_x86::{Mnemonic, OpKind};

    fn flip_for(endbr: bool) -> FlipPlan {
        let mut bytes = vec![0x90; 6];
        if endbr {
            bytes.extend_from_slice(&[0xf3, 0x0f, 0x1e, 0xfa]);
        }
        bytes.extend_from_slice(&[0x66, 0x90, 0x53, 0xc3]);
        let e = recognize_prepared(0x1000, 0x1006, &bytes).unwrap();
        plan_flip(&e, &[0x53, 0xc3]).unwrap()
    }

    fn apply(mem: &mut std::collections::HashMap<u64, u8>, w: &Write) {
        for (i, (&old, &new)) in w.expected.iter().zip(&w.new).enumerate() {
            let b = mem.entry(w.address + i as u64).or_insert(0);
            assert_eq!(*b, old, "CAS mismatch at {:#x}", w.address + i as u64);
            *b = new;
        }
    }

    /// Follow the patched code from the entry, by decoding, to the slot.
    fn follow(flip: FlipPlan, bias: u64) -> (u64, u64) {
        let slot = bias + 0x1000 + 0x7000_0000;
        let trampoline = bias + 0x1000 + 0x7000_1000;
        let f = flip_writes(
            "f",
            "img",
            bias,
            &flip,
            0x7fff_1234_5678,
            Scratch {
                slot,
                trampoline: Some(trampoline),
            },
        )
        .unwrap();
        let mut mem = std::collections::HashMap::new();
        // Memory before: nops in the padding, entry nops, zeros in scratch.
        for a in 0..6 {
            mem.insert(bias + 0x1000 + a, 0x90);
        }
        for (i, b) in flip.original.iter().enumerate() {
            mem.insert(f.entry + i as u64, *b);
        }
        for w in f.prepare.iter().chain(&f.entry_flip.writes) {
            apply(&mut mem, w);
        }
        let read = |mem: &std::collections::HashMap<u64, u8>, a: u64| -> Vec<u8> {
            (0..15).map(|i| mem.get(&(a + i)).copied().unwrap_or(0)).collect()
        };
        let mut pc = f.entry;
        for _ in 0..4 {
            let insn = decode_one(&read(&mem, pc), pc);
            assert_eq!(insn.mnemonic(), Mnemonic::Jmp);
            if insn.op0_kind() == OpKind::Memory {
                let slot_addr = insn.ip_rel_memory_address();
                let value = u64::from_le_bytes(read(&mem, slot_addr)[..8].try_into().unwrap());
                return (slot_addr, value);
            }
            pc = insn.near_branch_target();
        }
        panic!("no jump through the slot");
    }

    #[test]
    fn entry_reaches_the_replacement_through_the_slot() {
        for endbr in [false, true] {
            for bias in [0, 0x5555_5555_0000] {
                let (slot, value) = follow(flip_for(endbr), bias);
                assert_eq!(slot, bias + 0x1000 + 0x7000_0000);
                assert_eq!(value, 0x7fff_1234_5678);
            }
        }
    }

    #[test]
    fn slot_out_of_reach_is_an_error() {
        let e = flip_writes(
            "f",
            "img",
            0,
            &flip_for(false),
            1,
            Scratch {
                slot: 0x1_0000_0000_0000,
                trampoline: None,
            },
        )
        .unwrap_err();
        assert!(matches!(e, PlanError::OutOfRange { .. }), "{e}");
        let e = flip_writes(
            "f",
            "img",
            0,
            &flip_for(true),
            1,
            Scratch {
                slot: 0x2000,
                trampoline: None,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("trampoline"), "{e}");
    }

    #[test]
    fn detour_reaches_the_slot_and_the_trampoline_comes_back() {
        use crate::arch::x86_64::analyze_detour;
        // endbr64; push rbp; mov rbp,rsp; mov eax,[rip+0x100]; pop rbp; ret
        let code = [
            0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48, 0x89, 0xe5, 0x8b, 0x05, 0x00, 0x01, 0x00, 0x00, 0x5d, 0xc3,
        ];
        let bias = 0x5555_0000_0000;
        let d = analyze_detour(0x1000, &code).unwrap();
        assert_eq!((d.patch_at, d.displaced), (0x1004, 10));
        let scratch = DetourScratch {
            slot: bias + 0x20_0000,
            dispatcher: bias + 0x30_0000,
            trampoline: bias + 0x30_0010,
        };
        let subject = Subject {
            name: "f",
            image: "img",
            bias,
            entry: 0x1000,
        };
        let f = detour_writes(subject, &d, &code, 0x7f00_0000_1234, scratch).unwrap();
        let entry_jump = &f.entry_flip.writes[0];
        assert_eq!(entry_jump.address, bias + 0x1004);
        assert_eq!(entry_jump.expected, code[4..9].to_vec());
        assert_eq!(
            (f.entry_flip.overwrite, f.entry_flip.live_safe),
            (
                Overwrite {
                    start: bias + 0x1004,
                    len: 10
                },
                false
            )
        );
        let jmp = decode_one(&entry_jump.new, entry_jump.address);
        assert_eq!(
            (jmp.mnemonic(), jmp.near_branch_target()),
            (Mnemonic::Jmp, scratch.dispatcher)
        );
        let disp = decode_one(&f.prepare[1].new, scratch.dispatcher);
        assert_eq!(
            (disp.op0_kind(), disp.ip_rel_memory_address()),
            (OpKind::Memory, scratch.slot)
        );
        assert_eq!(f.prepare[0].new, 0x7f00_0000_1234u64.to_le_bytes().to_vec());
        // The trampoline: the moved instructions (the rip-relative load
        // still reads the same absolute address), then a jump back.
        let mut dec = iced_x86::Decoder::with_ip(64, &f.prepare[2].new, scratch.trampoline, 0);
        let insns: Vec<_> = (&mut dec).into_iter().collect();
        let load = insns.iter().find(|i| i.is_ip_rel_memory_operand()).unwrap();
        assert_eq!(load.ip_rel_memory_address(), bias + 0x100e + 0x100);
        let last = insns.last().unwrap();
        assert_eq!(
            (last.mnemonic(), last.near_branch_target()),
            (Mnemonic::Jmp, bias + 0x100e)
        );
        assert_eq!(f.original, scratch.trampoline);
    }

    #[test]
    fn start_of_range_is_not_inside() {
        let r = Overwrite {
            start: 0x1000,
            len: 7,
        };
        assert!(!r.contains(0x1000));
        assert!(r.contains(0x1001) && r.contains(0x1006));
        assert!(!r.contains(0x1007));
    }

    #[test]
    fn inverse_swaps() {
        let w = Write {
            address: 5,
            expected: vec![1],
            new: vec![2],
        };
        assert_eq!(w.inverse().inverse(), w);
        assert_eq!(w.inverse().new, vec![1]);
    }
}

#[cfg(test)]
mod lean_tests {
    use super::*;
    use crate::image::lookup::symbols;
    use proptest::prelude::*;

    const LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";

    /// Every `step`-th symbol name of `image` (raw, demangled, `file:`
    /// qualified, by address), and a few names that name nothing.
    fn sample_names(image: &Image, step: usize) -> Vec<String> {
        let mut names = vec![
            "no_such_function".to_string(),
            "0xzz".into(),
            "x.c:nothing".into(),
        ];
        for s in symbols(image).iter().step_by(step) {
            names.push(s.name.clone());
            names.push(format!("{:#x}", s.address));
            if let Some(d) = crate::image::symbol::demangle(&s.name) {
                names.push(d);
            }
            if let Some(f) = &s.file {
                names.push(format!("{f}:{}", s.name));
            }
        }
        names
    }

    /// The lean planner answers every name as the whole-image one does.
    fn agree(path: &str, step: usize) {
        let image = Image::open(path).unwrap();
        let file = ImageFile::open(path, path).unwrap();
        let whole = Planner::new(&image);
        let names = sample_names(&image, step);
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let lean = Planner::lean(&file, &refs).unwrap();
        let mut methods = 0;
        for name in &names {
            assert_eq!(lean.symbol(name), whole.symbol(name), "{path}: symbol {name}");
            let (l, w) = (lean.method(name), whole.method(name));
            assert_eq!(l, w, "{path}: method {name}");
            methods += usize::from(w.is_ok());
        }
        assert!(methods > 0, "{path}: no patchable function sampled");
    }

    #[test]
    fn lean_planner_agrees_on_libc() {
        if std::fs::metadata(LIBC).is_err() {
            eprintln!("{LIBC} not readable: skipped");
            return;
        }
        agree(LIBC, 7);
    }

    #[test]
    fn lean_planner_agrees_on_a_prepared_c_binary_and_a_rust_binary() {
        let dir = tempfile::tempdir().unwrap();
        let source = "static int helper(int x) { return x * 3 + 1; }\n\
                      int work(int x) { return helper(x) + helper(x + 1); }\n\
                      int unprepared_twin(int x) { return work(x) - 2; }\n\
                      /* Rust legacy mangling, with `a` spelled as an escape: `foo::apply`. */\n\
                      int escaped(int x) __asm__(\"_ZN3foo9$u61$pply17h0123456789abcdefE\");\n\
                      int escaped(int x) { return x * 7; }\n\
                      int main(int argc, char **argv) { (void)argv; return work(argc) + unprepared_twin(argc) + escaped(argc); }\n";
        let exe = hotpatch_testkit::build::build_target(dir.path(), "cc", "lean", source, &[]);
        agree(exe.to_str().unwrap(), 1);
        let file = ImageFile::open(&exe, &exe).unwrap();
        let escaped = Planner::lean(&file, &["foo::apply"])
            .unwrap()
            .symbol("foo::apply");
        assert_eq!(
            escaped.map(|s| s.name),
            Ok("_ZN3foo9$u61$pply17h0123456789abcdefE".to_string())
        );
        let plain = hotpatch_testkit::build::build_unprepared(dir.path(), "cc", "plain", source, &[]);
        agree(plain.to_str().unwrap(), 1);
        // This test binary: Rust names, legacy-mangled, with hashes.
        let me = std::fs::read_link("/proc/self/exe").unwrap();
        agree(me.to_str().unwrap(), 997);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Random names (pieces of real names, `::` paths, `file:` forms)
        /// are found, or not, alike.
        #[test]
        fn random_names_agree(pieces in proptest::collection::vec(
            prop_oneof![
                Just("mem".to_string()), Just("cpy".to_string()), Just("::".to_string()),
                Just("str".to_string()), Just("_".to_string()), Just("malloc".to_string()),
                Just(":".to_string()), Just("$u".to_string()), Just(".c".to_string()),
                "[a-z_]{1,6}",
            ], 1..5)) {
            let query = pieces.concat();
            let Ok(image) = Image::open(LIBC) else { return Ok(()); };
            let file = ImageFile::open(LIBC, LIBC).unwrap();
            let lean = Planner::lean(&file, &[&query]).unwrap();
            let index = SymbolIndex::new(&image);
            // The same answer; the planner's not-found says more (a hint).
            let unhinted = |r: Result<SymbolMatch, PlanError>| match r {
                Err(PlanError::Lookup(LookupError::NotFound { image, query, .. })) => {
                    Err(PlanError::Lookup(LookupError::NotFound { image, query, hint: Box::default() }))
                }
                other => other,
            };
            prop_assert_eq!(unhinted(lean.symbol(&query)), index.find(&query).map_err(PlanError::from));
        }
    }
}
