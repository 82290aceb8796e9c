//! What in an image can be hot-patched, and how: every function classified
//! as prepared (with its flip plan), detourable, or not patchable (with the
//! reason). Pure: works on a parsed [`Image`].

use crate::arch::x86_64::entry::{self, MAX_PADDING};
use crate::arch::x86_64::{
    DetourRefusal, FlipPlan, analyze_detour, direct_branch_targets, plan_flip, recognize_prepared,
};
use crate::image::{Function, FunctionKind, Image, ImageFile, ImageKind};
use serde::Serialize;
use std::collections::BTreeMap;

/// Why a function is not patchable, as a short stable key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    TooSmall,
    UnknownSize,
    Undecodable,
    Unrelocatable,
    BranchIntoEntry,
    SymbolInsideEntry,
    Breakpoint,
    IfuncResolver,
    ColdPart,
    NotInFile,
}

impl Reason {
    /// The words a person reads in the summary table.
    pub fn label(self) -> &'static str {
        match self {
            Reason::TooSmall => "too small",
            Reason::UnknownSize => "no symbol size",
            Reason::Undecodable => "undecodable",
            Reason::Unrelocatable => "unrelocatable instruction",
            Reason::BranchIntoEntry => "branch into first bytes",
            Reason::SymbolInsideEntry => "symbol inside first bytes",
            Reason::Breakpoint => "breakpoint at entry",
            Reason::IfuncResolver => "ifunc resolver",
            Reason::ColdPart => "cold part",
            Reason::NotInFile => "code not in file",
        }
    }
}

/// How one function can be patched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "class", rename_all = "kebab-case")]
pub enum Class {
    /// Built with padding: flipped by a slot, a long jump and a short jump.
    Prepared {
        layout: String,
        live_safe: bool,
        flip: FlipPlan,
    },
    /// No padding, but a 5-byte jump with relocated instructions works.
    Detourable {
        #[serde(flatten)]
        detour: crate::arch::x86_64::Detour,
        /// Direct calls and jumps to the entry from code of the same image.
        /// Their callers may rely on registers the ABI does not promise
        /// (gcc's IPA register allocation, on by default without padding):
        /// replacing the function with any ABI-conforming code can corrupt
        /// them. `apply` asks for an explicit flag for these.
        direct_calls: usize,
        /// Why the function is listed as prepared but its padding cannot be
        /// used, when that is the case.
        #[serde(skip_serializing_if = "Option::is_none")]
        note: Option<String>,
    },
    NotPatchable {
        reason: Reason,
        detail: String,
    },
}

impl Class {
    pub fn name(&self) -> &'static str {
        match self {
            Class::Prepared { live_safe: true, .. } => "prepared",
            Class::Prepared { live_safe: false, .. } => "prepared (stop)",
            Class::Detourable { .. } => "detourable",
            Class::NotPatchable { .. } => "not patchable",
        }
    }
}

/// One function and its class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FunctionReport {
    pub address: u64,
    pub size: u64,
    /// The preferred name, demangled; `fn@0x…` for a prepared site no
    /// symbol names (stripped binaries).
    pub name: String,
    /// Every raw symbol name at this address.
    pub symbols: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clone_of: Option<String>,
    #[serde(flatten)]
    pub class: Class,
}

/// The counts of an image's report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub functions: usize,
    pub prepared: usize,
    /// Prepared functions whose flip is proven safe with threads running.
    pub prepared_live_safe: usize,
    pub detourable: usize,
    /// Detourable functions that code of the same image calls directly
    /// (the register-allocation hazard; see [`Class::Detourable`]).
    pub detourable_direct_calls: usize,
    pub not_patchable: usize,
    /// Reasons with their counts, most frequent first.
    pub reasons: Vec<ReasonCount>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReasonCount {
    pub reason: Reason,
    pub label: &'static str,
    pub count: usize,
}

/// The patchability of one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageReport {
    pub path: String,
    pub kind: ImageKind,
    pub build_id: Option<String>,
    pub soname: Option<String>,
    /// Where a running process mapped it (set by `check --pid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_bias: Option<u64>,
    /// Sites in `__patchable_function_entries`.
    pub padded_sites: usize,
    pub summary: Summary,
    pub functions: Vec<FunctionReport>,
}

/// The code bytes classification reads: an [`Image`] in memory, or an
/// [`ImageFile`] read by ranges.
pub(crate) trait CodeBytes {
    fn bytes_at(&self, address: u64, len: u64) -> Option<&[u8]>;
}

impl CodeBytes for Image {
    fn bytes_at(&self, address: u64, len: u64) -> Option<&[u8]> {
        Image::bytes_at(self, address, len)
    }
}

impl CodeBytes for ImageFile {
    fn bytes_at(&self, address: u64, len: u64) -> Option<&[u8]> {
        ImageFile::bytes_at(self, address, len)
    }
}

/// Classify every function of `image`.
pub fn survey(image: &Image) -> ImageReport {
    let functions = image.functions();
    let targets = branch_targets(image);
    let entries: Vec<u64> = functions.iter().map(|f| f.address).collect();

    // Prepared sites, each mapped to the function whose entry follows it.
    let mut site_of: BTreeMap<u64, u64> = BTreeMap::new();
    let mut unnamed = Vec::new();
    for &site in image.padded_sites() {
        let next = entries.partition_point(|&a| a < site);
        match entries.get(next) {
            Some(&entry) if entry - site <= MAX_PADDING && padding_only(image, site, entry) => {
                site_of.insert(entry, site);
            }
            _ => unnamed.push(site),
        }
    }

    let mut reports: Vec<FunctionReport> = functions
        .iter()
        .map(|f| {
            let class = match classify_entry(image, f, site_of.get(&f.address).copied()) {
                Entry::Done(class) => class,
                Entry::Detour { detour, note } => {
                    let name_at = |a: u64| image.function_at(a).map(|g| g.name().display().to_string());
                    classify_detour(f, detour, note, &targets, &entries, name_at)
                }
            };
            let name = f.name();
            FunctionReport {
                address: f.address,
                size: f.size,
                name: name.display().to_string(),
                symbols: f.names.iter().map(|n| n.name.clone()).collect(),
                clone_of: name.clone_of.as_ref().map(|(base, _)| base.clone()),
                class,
            }
        })
        .collect();
    for site in unnamed {
        // The window is cut at the end of the code: the last function of a
        // segment has fewer than `MAX_PADDING + 8` bytes after its site.
        let len = image
            .code_end(site)
            .map_or(0, |end| (end - site).min(MAX_PADDING + 8));
        let bytes = image.bytes_at(site, len).unwrap_or(&[]);
        let Some(entry) = entry::guess_entry(site, bytes) else {
            continue;
        };
        let class = match prepared_class(image, site, entry) {
            Ok(class) => class,
            Err(detail) => Class::NotPatchable {
                reason: Reason::NotInFile,
                detail,
            },
        };
        reports.push(FunctionReport {
            address: entry,
            size: 0,
            name: format!("fn@{entry:#x}"),
            symbols: Vec::new(),
            clone_of: None,
            class,
        });
    }
    reports.sort_by_key(|r| r.address);

    ImageReport {
        path: image.path().display().to_string(),
        kind: image.kind(),
        build_id: image.build_id_hex(),
        soname: image.soname().map(str::to_string),
        load_bias: None,
        padded_sites: image.padded_sites().len(),
        summary: summarize(&reports),
        functions: reports,
    }
}

/// Whether everything from `site` to `entry` is padding (nop or int3).
pub(crate) fn padding_only(image: &impl CodeBytes, site: u64, entry: u64) -> bool {
    image
        .bytes_at(site, entry - site)
        .is_some_and(|b| b.iter().all(|&x| x == entry::NOP || x == 0xcc))
}

/// Sorted targets of every direct branch and call in the image's code, one
/// entry per branch site (so a target's count is its number of callers).
///
/// Every byte of executable code is decoded, not only the code symbols
/// cover: stripped code (most of a distribution binary's `.text`) calls
/// and jumps too. The decoder restarts at every function entry and padded
/// site, so it stays in step with the code the symbols describe; in code
/// no symbol covers, data mixed into the code can throw the linear decode
/// out of step until it resynchronises. That can add a caller that is not
/// one (the tool is then more careful than needed) but it only misses a
/// real caller whose bytes were decoded as part of another instruction.
pub(crate) fn branch_targets(image: &Image) -> Vec<u64> {
    let pieces = code_pieces(image);
    // Decoding all of a large image's code is most of a survey's time; the
    // pieces are independent, so a few threads share them.
    let total: usize = pieces.iter().map(|(_, c)| c.len()).sum();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4)
        .min(total / PARALLEL_MIN_BYTES + 1);
    let mut targets = decode_in_parallel(&pieces, threads);
    targets.sort_unstable();
    targets
}

/// Every byte of the image's code ranges, cut at every function entry and
/// padded site (where the decoder restarts), with the address of each piece.
fn code_pieces(image: &Image) -> Vec<(u64, &[u8])> {
    let mut starts: Vec<u64> = image.functions().iter().map(|f| f.address).collect();
    starts.extend_from_slice(image.padded_sites());
    starts.sort_unstable();
    starts.dedup();
    let mut pieces: Vec<(u64, &[u8])> = Vec::new();
    for range in image.code_ranges() {
        let first = starts.partition_point(|&a| a <= range.start);
        let cuts = starts[first..].iter().take_while(|&&a| a < range.end);
        let mut from = range.start;
        for &to in cuts.chain(std::iter::once(&range.end)) {
            if let Some(code) = image.bytes_at(from, to - from) {
                pieces.push((from, code));
            }
            from = to;
        }
    }
    pieces
}

/// The targets [`branch_targets`] finds inside `window`, sorted, from
/// decoding only the pieces of code that can hold a branch there. `ranges`
/// are the image's code ranges, `starts` the sorted function entries and
/// padded sites (where [`code_pieces`] cuts), and `read(address, buf)`
/// fills `buf` with the code bytes at `address` (false: it cannot; then
/// the answer is `None`). The code is read in chunks, never whole.
///
/// A direct branch ends with its displacement: rel32 (`call`, `jmp`,
/// `jcc`, `xbegin`), rel16 (`xbegin` with `66`) or rel8. Every position
/// whose 4 bytes, read as a rel32 ending there, reach the window (a cheap
/// scan of all code) marks its piece; every piece within rel16 reach
/// (±32 KiB) of the window is marked too. Marked pieces are decoded as
/// [`code_pieces`] has them, so the answer is the whole scan's, restricted
/// to `window`. `None` too for a window below 64 KiB, where a 16-bit
/// branch target (truncated) from anywhere could land: decode everything.
pub(crate) fn branch_targets_into(
    ranges: &[std::ops::Range<u64>],
    starts: &[u64],
    window: std::ops::Range<u64>,
    read: impl Fn(u64, &mut [u8]) -> bool + Sync,
) -> Option<Vec<u64>> {
    targets_into_by_chunks(ranges, starts, window, read, 1 << 20)
}

/// [`branch_targets_into`], reading `chunk` bytes at a time.
fn targets_into_by_chunks(
    ranges: &[std::ops::Range<u64>],
    starts: &[u64],
    window: std::ops::Range<u64>,
    read: impl Fn(u64, &mut [u8]) -> bool + Sync,
    chunk: usize,
) -> Option<Vec<u64>> {
    const NEAR: u64 = (1 << 15) + 16;
    let len = u32::try_from(window.end.checked_sub(window.start)?).ok()?;
    if window.start < 1 << 16 {
        return None;
    }
    let near = window.start.saturating_sub(NEAR)..window.end.saturating_add(NEAR);
    let hits = rel32_hits_in_ranges(ranges, &window, len, &read, chunk)?;
    let mut targets = Vec::new();
    let mut buf = Vec::new();
    for range in ranges {
        let (base, end) = (range.start, range.end);
        let first = starts.partition_point(|&a| a <= base);
        // Piece k runs from bounds[k] to bounds[k + 1].
        let mut bounds = vec![base];
        bounds.extend(starts[first..].iter().copied().take_while(|&a| a < end));
        bounds.push(end);
        let piece_of = |address: u64| bounds.partition_point(|&b| b <= address).saturating_sub(1);
        let mut marked: Vec<usize> = Vec::new();
        if near.start < end && near.end > base {
            marked.extend(piece_of(near.start.max(base))..=piece_of((near.end - 1).min(end - 1)));
        }
        let inside = hits.partition_point(|&h| h < base)..hits.partition_point(|&h| h < end);
        marked.extend(hits[inside].iter().map(|&h| piece_of(h)));
        marked.sort_unstable();
        marked.dedup();
        for k in marked {
            let (from, to) = (bounds[k], bounds[k + 1]);
            buf.resize(usize::try_from(to - from).ok()?, 0);
            if !read(from, &mut buf) {
                return None;
            }
            let mut found = Vec::new();
            direct_branch_targets(from, &buf, &mut found);
            targets.extend(found.into_iter().filter(|t| window.contains(t)));
        }
    }
    targets.sort_unstable();
    Some(targets)
}

/// Every position in `ranges` whose 4 bytes, as a rel32 ending after
/// them, point into `window` (see [`rel32_hits`]), sorted; the code read
/// `chunk` bytes at a time (chunks overlap by 3 bytes so that every
/// 4-byte window is seen once). Above [`PARALLEL_SCAN_MIN_BYTES`], the
/// code is shared among up to [`SCAN_THREADS`] threads, each reading
/// and scanning its own part. `None` if some code cannot be read.
fn rel32_hits_in_ranges(
    ranges: &[std::ops::Range<u64>],
    window: &std::ops::Range<u64>,
    len: u32,
    read: &(impl Fn(u64, &mut [u8]) -> bool + Sync),
    chunk: usize,
) -> Option<Vec<u64>> {
    // Positions p with p + 4 <= range end; (start, end of positions, end of range).
    let spans: Vec<(u64, u64, u64)> = ranges
        .iter()
        .filter(|r| r.end.saturating_sub(r.start) >= 4)
        .map(|r| (r.start, r.end - 3, r.end))
        .collect();
    let total: u64 = spans.iter().map(|s| s.1 - s.0).sum();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(SCAN_THREADS);
    let scan = |spans: &[(u64, u64, u64)]| -> Option<Vec<u64>> {
        let mut hits = Vec::new();
        let mut buf = Vec::new();
        for &(start, positions_end, range_end) in spans {
            let mut at = start;
            while at < positions_end {
                let positions = (positions_end - at).min(chunk.max(1) as u64);
                let n = usize::try_from((positions + 3).min(range_end - at)).ok()?;
                buf.resize(n, 0);
                if !read(at, &mut buf) {
                    return None;
                }
                rel32_hits(&buf, at, window, len, |address| hits.push(address));
                at += positions;
            }
        }
        Some(hits)
    };
    if threads <= 1 || total < PARALLEL_SCAN_MIN_BYTES {
        let mut hits = scan(&spans)?;
        hits.sort_unstable();
        return Some(hits);
    }
    // Cut the spans into `threads` shares of about equal size.
    let share = total.div_ceil(threads as u64);
    let mut shares: Vec<Vec<(u64, u64, u64)>> = vec![Vec::new()];
    let mut size = 0;
    for &(start, positions_end, range_end) in &spans {
        let mut at = start;
        while at < positions_end {
            let take = (positions_end - at).min(share - size);
            if let Some(current) = shares.last_mut() {
                current.push((at, at + take, range_end));
            }
            at += take;
            size += take;
            if size == share {
                shares.push(Vec::new());
                size = 0;
            }
        }
    }
    let parts: Vec<Option<Vec<u64>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = shares.iter().map(|part| scope.spawn(|| scan(part))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    let mut hits = Vec::new();
    for part in parts {
        hits.extend(part?);
    }
    hits.sort_unstable();
    Some(hits)
}

/// At most this many threads share a scan of all the code.
const SCAN_THREADS: usize = 4;
/// Below this much code, one thread scans it all.
const PARALLEL_SCAN_MIN_BYTES: u64 = 4 << 20;

/// Call `hit` with the address of every position of `code` (at `base`)
/// whose 4 bytes, as a rel32 ending after them, point into `window`
/// (`len` long), modulo 2^32, in order: exactly the positions
/// [`rel32_hits_one_by_one`] reports. Blocks of [`SCAN_BLOCK`] positions
/// are tested first with a branch-free loop that the compiler vectorises
/// (with AVX2 where the CPU has it); only a block with a hit is gone over
/// position by position.
fn rel32_hits(code: &[u8], base: u64, window: &std::ops::Range<u64>, len: u32, mut hit: impl FnMut(u64)) {
    // target = base + i + 4 + rel32 (mod 2^32) lies in the window iff
    // rel32 + i - c < len, with c = window.start - base - 4 (mod 2^32).
    let c = window.start.wrapping_sub(base.wrapping_add(4)) as u32;
    let positions = code.len().saturating_sub(3);
    let mut start = 0;
    while start < positions {
        let end = (start + SCAN_BLOCK).min(positions);
        // The block's positions and the 3 bytes the last one reads.
        if any_rel32_into(&code[start..end + 3], (start as u32).wrapping_sub(c), len) {
            rel32_hits_one_by_one(
                &code[start..end + 3],
                base + start as u64,
                c.wrapping_sub(start as u32),
                len,
                &mut hit,
            );
        }
        start = end;
    }
}

/// Positions per block of [`rel32_hits`]: small enough that a block is
/// read again from L1 when it has a hit, large enough that the tests run
/// in long vector loops.
const SCAN_BLOCK: usize = 1024;

/// The straightforward scan: every position of `code` (at `base`) where
/// `rel32 + i - c < len` (mod 2^32), one at a time.
fn rel32_hits_one_by_one(code: &[u8], base: u64, c: u32, len: u32, hit: &mut impl FnMut(u64)) {
    for i in 0..code.len().saturating_sub(3) {
        let rel = u32::from_le_bytes([code[i], code[i + 1], code[i + 2], code[i + 3]]);
        if rel.wrapping_add((i as u32).wrapping_sub(c)) < len {
            hit(base + i as u64);
        }
    }
}

/// Whether some position `i` of `bytes` (every `i` with `i + 4 <=
/// bytes.len()`) has `rel32(i) + d + i < len` (mod 2^32).
fn any_rel32_into(bytes: &[u8], d: u32, len: u32) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVX2: OnceLock<bool> = OnceLock::new();
        if *AVX2.get_or_init(|| std::arch::is_x86_feature_detected!("avx2")) {
            // SAFETY: the CPU has AVX2 (checked at run time just above),
            // the one requirement of a `target_feature(enable = "avx2")`
            // function.
            return unsafe { any_rel32_into_avx2(bytes, d, len) };
        }
    }
    any_rel32_into_portable(bytes, d, len)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn any_rel32_into_avx2(bytes: &[u8], d: u32, len: u32) -> bool {
    any_rel32_into_portable(bytes, d, len)
}

/// [`any_rel32_into`] as four passes, one per position modulo 4: in each,
/// the rel32s are consecutive aligned-to-the-pass `u32`s, a loop the
/// compiler turns into vector loads, adds and compares.
#[inline(always)]
fn any_rel32_into_portable(bytes: &[u8], d: u32, len: u32) -> bool {
    let mut any = 0u32;
    for r in 0..4 {
        let Some(pass) = bytes.get(r..) else { break };
        let start = d.wrapping_add(r as u32);
        let mut acc = 0u32;
        for (j, w) in pass.chunks_exact(4).enumerate() {
            let rel = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            let at = start.wrapping_add((4 * j) as u32);
            acc |= u32::from(rel.wrapping_add(at) < len);
        }
        any |= acc;
    }
    any != 0
}

/// [`decode_pieces`] of `pieces`, shared by `threads` threads in groups
/// of about equal size (unsorted).
fn decode_in_parallel(pieces: &[(u64, &[u8])], threads: usize) -> Vec<u64> {
    if threads <= 1 {
        return decode_pieces(pieces);
    }
    let total: usize = pieces.iter().map(|(_, c)| c.len()).sum();
    let share = total.div_ceil(threads).max(1);
    let mut groups: Vec<&[(u64, &[u8])]> = Vec::new();
    let (mut begin, mut size) = (0, 0);
    for (i, (_, code)) in pieces.iter().enumerate() {
        size += code.len();
        if size >= share {
            groups.push(&pieces[begin..=i]);
            (begin, size) = (i + 1, 0);
        }
    }
    groups.push(&pieces[begin..]);
    std::thread::scope(|scope| {
        let handles: Vec<_> = groups
            .iter()
            .map(|group| scope.spawn(move || decode_pieces(group)))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

/// Below this much code, one thread decodes it all.
const PARALLEL_MIN_BYTES: usize = 256 << 10;

fn decode_pieces(pieces: &[(u64, &[u8])]) -> Vec<u64> {
    let mut targets = Vec::new();
    for &(ip, code) in pieces {
        direct_branch_targets(ip, code, &mut targets);
    }
    targets
}

fn prepared_class(image: &impl CodeBytes, site: u64, entry: u64) -> Result<Class, String> {
    // Enough bytes for padding, endbr64, entry nops, and a decode window.
    let len = entry - site + 4 + 2 + 15;
    let bytes = image
        .bytes_at(site, len)
        .or_else(|| image.bytes_at(site, entry - site + 6))
        .ok_or_else(|| format!("the bytes at {site:#x} are not in the file"))?;
    let prepared = recognize_prepared(site, entry, bytes).map_err(|e| e.to_string())?;
    let following = bytes.get((prepared.nops_at + 2 - site) as usize..).unwrap_or(&[]);
    let flip = plan_flip(&prepared, following).map_err(|e| e.to_string())?;
    Ok(Class::Prepared {
        layout: prepared.layout(),
        live_safe: flip.live_safe(),
        flip,
    })
}

/// The first half of classifying `f`: everything but the branches into it.
pub(crate) enum Entry {
    Done(Class),
    /// A detour fits; whether code jumps into it decides.
    Detour {
        detour: crate::arch::x86_64::Detour,
        note: Option<String>,
    },
}

/// Classify `f` as far as its own bytes and its padded `site` tell.
pub(crate) fn classify_entry(image: &impl CodeBytes, f: &Function, site: Option<u64>) -> Entry {
    if f.kind == FunctionKind::IfuncResolver {
        return Entry::Done(Class::NotPatchable {
            reason: Reason::IfuncResolver,
            detail: "an IFUNC resolver runs once at load; patch the implementation it selects".into(),
        });
    }
    if f.is_cold_part() {
        return Entry::Done(Class::NotPatchable {
            reason: Reason::ColdPart,
            detail: "split-off cold code, entered by jumps from its parent; patch the parent".into(),
        });
    }
    let mut note = None;
    if let Some(site) = site {
        match prepared_class(image, site, f.address) {
            Ok(class) => return Entry::Done(class),
            Err(why) => note = Some(format!("listed as prepared, but {why}")),
        }
    }
    let Some(code) = image.bytes_at(f.address, f.size) else {
        return Entry::Done(Class::NotPatchable {
            reason: Reason::NotInFile,
            detail: format!("{} bytes at {:#x} are not in the file", f.size, f.address),
        });
    };
    match analyze_detour(f.address, code) {
        Ok(detour) => Entry::Detour { detour, note },
        Err(refusal) => {
            let reason = match refusal {
                DetourRefusal::UnknownSize => Reason::UnknownSize,
                DetourRefusal::TooSmall { .. } => Reason::TooSmall,
                DetourRefusal::Undecodable { .. } => Reason::Undecodable,
                DetourRefusal::Unrelocatable { .. } => Reason::Unrelocatable,
                DetourRefusal::Breakpoint { .. } => Reason::Breakpoint,
            };
            Entry::Done(Class::NotPatchable {
                reason,
                detail: refusal.to_string(),
            })
        }
    }
}

/// Finish classifying `f`, whose `detour` fits its bytes: `targets` are the
/// sorted targets of every direct branch of the image, `entries` the sorted
/// function entries (at least those near `f`), `name_at` names them.
pub(crate) fn classify_detour(
    f: &Function,
    detour: crate::arch::x86_64::Detour,
    note: Option<String>,
    targets: &[u64],
    entries: &[u64],
    name_at: impl Fn(u64) -> Option<String>,
) -> Class {
    let range = detour.patch_at + 1..detour.patch_at + detour.displaced;
    let first_in = |sorted: &[u64]| {
        sorted
            .get(sorted.partition_point(|&t| t < range.start))
            .copied()
            .filter(|t| range.contains(t))
    };
    if let Some(target) = first_in(targets) {
        return Class::NotPatchable {
            reason: Reason::BranchIntoEntry,
            detail: format!(
                "a branch targets {target:#x}, inside the {} bytes a jump would overwrite",
                detour.displaced
            ),
        };
    }
    if let Some(other) = first_in(entries) {
        let name = name_at(other).unwrap_or_default();
        return Class::NotPatchable {
            reason: Reason::SymbolInsideEntry,
            detail: format!(
                "function {} starts at {other:#x}, inside the {} bytes a jump would overwrite",
                crate::shorten::name(&name),
                detour.displaced
            ),
        };
    }
    let direct_calls =
        targets.partition_point(|&t| t <= f.address) - targets.partition_point(|&t| t < f.address);
    Class::Detourable {
        detour,
        note,
        direct_calls,
    }
}

fn summarize(reports: &[FunctionReport]) -> Summary {
    let mut s = Summary {
        functions: reports.len(),
        ..Summary::default()
    };
    let mut reasons: BTreeMap<Reason, usize> = BTreeMap::new();
    for r in reports {
        match &r.class {
            Class::Prepared { live_safe, .. } => {
                s.prepared += 1;
                s.prepared_live_safe += usize::from(*live_safe);
            }
            Class::Detourable { direct_calls, .. } => {
                s.detourable += 1;
                s.detourable_direct_calls += usize::from(*direct_calls > 0);
            }
            Class::NotPatchable { reason, .. } => {
                s.not_patchable += 1;
                *reasons.entry(*reason).or_default() += 1;
            }
        }
    }
    let mut reasons: Vec<ReasonCount> = reasons
        .into_iter()
        .map(|(reason, count)| ReasonCount {
            reason,
            label: reason.label(),
            count,
        })
        .collect();
    reasons.sort_by(|a, b| b.count.cmp(&a.count).then(a.reason.cmp(&b.reason)));
    s.reasons = reasons;
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";

    #[test]
    fn pieces_cover_every_code_byte_once() {
        let Ok(image) = Image::open(LIBC) else {
            eprintln!("{LIBC} not readable: skipped");
            return;
        };
        let pieces = code_pieces(&image);
        let covered: usize = pieces.iter().map(|(_, c)| c.len()).sum();
        let code: u64 = image.code_ranges().iter().map(|r| r.end - r.start).sum();
        assert_eq!(covered as u64, code);
        assert!(pieces.windows(2).all(|w| w[0].0 + w[0].1.len() as u64 <= w[1].0));
        // More code than the symbols cover (libc's .symtab is stripped).
        let named: u64 = image.functions().iter().map(|f| f.size).sum();
        assert!(code > named, "{code} <= {named}");
    }

    #[test]
    fn threads_find_the_same_targets_as_one() {
        let Ok(image) = Image::open(LIBC) else {
            eprintln!("{LIBC} not readable: skipped");
            return;
        };
        let pieces = code_pieces(&image);
        let mut one = decode_pieces(&pieces);
        one.sort_unstable();
        for threads in [2, 3, 7] {
            let mut many = decode_in_parallel(&pieces, threads);
            many.sort_unstable();
            assert_eq!(many, one, "{threads} threads");
        }
        assert!(!one.is_empty());
    }

    #[test]
    fn targets_into_a_window_are_the_whole_scan_s() {
        let Ok(image) = Image::open(LIBC) else {
            eprintln!("{LIBC} not readable: skipped");
            return;
        };
        let all = branch_targets(&image);
        let ranges = image.code_ranges();
        let read = |address: u64, buf: &mut [u8]| match image.bytes_at(address, buf.len() as u64) {
            Some(b) => {
                buf.copy_from_slice(b);
                true
            }
            None => false,
        };
        let mut starts: Vec<u64> = image.functions().iter().map(|f| f.address).collect();
        starts.extend_from_slice(image.padded_sites());
        starts.sort_unstable();
        starts.dedup();
        // Windows at function entries (where callers land) and at every
        // 97th branch target (where some branch surely lands).
        let windows = image
            .functions()
            .iter()
            .step_by(5)
            .map(|f| f.address)
            .chain(all.iter().step_by(97).copied())
            .map(|a| a..a + 20);
        let mut nonempty = 0;
        for (n, w) in windows.enumerate() {
            let expected: Vec<u64> = all.iter().copied().filter(|t| w.contains(t)).collect();
            let found = branch_targets_into(ranges, &starts, w.clone(), read);
            assert_eq!(found.as_ref(), Some(&expected), "{w:x?}");
            // Chunks of odd sizes, down to the 4-byte minimum.
            for chunk in [1, 4093].into_iter().filter(|_| n % 50 == 0) {
                let found = targets_into_by_chunks(ranges, &starts, w.clone(), read, chunk);
                assert_eq!(found.as_ref(), Some(&expected), "{w:x?}, chunk {chunk}");
            }
            nonempty += usize::from(!expected.is_empty());
        }
        assert!(nonempty > 100, "{nonempty}");
        assert_eq!(branch_targets_into(ranges, &starts, 0x1000..0x1010, read), None);
    }

    /// Code big enough to be shared among threads: the hits are those of
    /// the one-at-a-time scan of each range, wherever the shares are cut.
    #[test]
    fn a_scan_shared_among_threads_finds_every_hit_once() {
        let size = (PARALLEL_SCAN_MIN_BYTES as usize) * 3 / 2;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut code: Vec<u8> = (0..size)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let base = 0x40_0000u64;
        let window = base + 0x1234..base + 0x1234 + 16;
        // Branches into the window around every place a share could end.
        for at in (0..size - 8)
            .step_by(size / 16)
            .flat_map(|p| (p.saturating_sub(9)..p + 9).step_by(4))
        {
            let rel = (window.start + 3).wrapping_sub(base + at as u64 + 4) as u32;
            code[at..at + 4].copy_from_slice(&rel.to_le_bytes());
        }
        let ranges = [
            base..base + size as u64 / 3,
            base + size as u64 / 3 + 1..base + size as u64,
        ];
        let read = |address: u64, buf: &mut [u8]| {
            let from = (address - base) as usize;
            match code.get(from..from + buf.len()) {
                Some(bytes) => {
                    buf.copy_from_slice(bytes);
                    true
                }
                None => false,
            }
        };
        let c = window.start.wrapping_sub(base + 4) as u32;
        let mut expected = Vec::new();
        for r in &ranges {
            let bytes = &code[(r.start - base) as usize..(r.end - base) as usize];
            rel32_hits_one_by_one(
                bytes,
                r.start,
                c.wrapping_sub((r.start - base) as u32),
                16,
                &mut |a| expected.push(a),
            );
        }
        assert!(expected.len() >= 64, "{}", expected.len());
        for chunk in [1 << 20, 4093] {
            let found = rel32_hits_in_ranges(&ranges, &window, 16, &read, chunk);
            assert_eq!(found.as_ref(), Some(&expected), "chunk {chunk}");
        }
        let unreadable = |_: u64, _: &mut [u8]| false;
        assert_eq!(
            rel32_hits_in_ranges(&ranges, &window, 16, &unreadable, 1 << 20),
            None
        );
    }

    proptest::proptest! {
        /// The block scan reports exactly what the one-at-a-time scan
        /// reports (the same positions, in order), so every branch that
        /// lands in the window (which it compares modulo 2^32).
        #[test]
        fn rel32_scan_misses_nothing(
            mut code in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000),
            planted in proptest::collection::vec((0usize..3000, 0u64..40), 0..6),
            base in 0x10000u64..0x1000_0000,
            offset in 0u64..400,
            len in 1u32..40,
        ) {
            let window = base + offset..base + offset + u64::from(len);
            // Branches that land in the window (some overwritten by others).
            for (at, k) in planted {
                if at + 4 <= code.len() {
                    let rel = (window.start + k % u64::from(len)).wrapping_sub(base + at as u64 + 4);
                    code[at..at + 4].copy_from_slice(&(rel as u32).to_le_bytes());
                }
            }
            let mut naive = Vec::new();
            for i in 0..code.len().saturating_sub(3) {
                let rel = i32::from_le_bytes([code[i], code[i + 1], code[i + 2], code[i + 3]]);
                let target = (base + i as u64 + 4).wrapping_add(rel as i64 as u64);
                // Below 2^32 away, mod 2^32 equality is equality.
                if window.contains(&target) {
                    naive.push(base + i as u64);
                }
            }
            let mut fast = Vec::new();
            rel32_hits(&code, base, &window, len, |a| fast.push(a));
            for a in &naive {
                proptest::prop_assert!(fast.contains(a), "{a:#x} missed");
            }
            let mut exact = Vec::new();
            let c = window.start.wrapping_sub(base + 4) as u32;
            rel32_hits_one_by_one(&code, base, c, len, &mut |a| exact.push(a));
            proptest::prop_assert_eq!(&fast, &exact);
            // And without AVX2, what the compiler makes of the plain loop.
            let d = 0u32.wrapping_sub(c);
            proptest::prop_assert_eq!(any_rel32_into_portable(&code, d, len), !exact.is_empty());
        }
    }
}
