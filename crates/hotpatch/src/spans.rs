//! Compare-and-swap writes grouped into page spans: the byte ranges of
//! many small writes (a slot, a padding jump, one byte of an entry) that
//! start in the same page become one range, read once, checked write by
//! write against the bytes each expects, and written back once with only
//! those writes' bytes changed. A 1,000-function apply then makes a few
//! dozen reads and writes through `/proc/PID/mem` instead of 12,000.
//!
//! Pure: which ranges form a span, and the bytes a span gets from the
//! bytes read. The I/O is in [`crate::engine`].
//!
//! Why rewriting the bytes between the writes is harmless: they get the
//! exact bytes read a moment before, and a byte stored with the value it
//! holds changes nothing for a thread executing or reading it (no torn
//! state exists between two equal values). Nothing else writes those bytes
//! meanwhile: code is written only by the tool, which holds the target's
//! lock, and live slots only by the tool's own program, whose stores come
//! after (never during) the tool's writes.

use crate::plan::Write;

/// The span a range may join: the page of the span's first byte.
pub const PAGE: u64 = 4096;

/// One range of target memory covering some writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub start: u64,
    pub len: usize,
    /// Indices of the writes (or ranges) it covers, by address.
    pub members: Vec<usize>,
}

impl Span {
    pub fn end(&self) -> u64 {
        self.start + self.len as u64
    }
}

/// Why ranges cannot be grouped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpanError {
    #[error("two writes overlap at {address:#x} (a plan error; nothing written)")]
    Overlap { address: u64 },
    #[error("the range at {address:#x} ({len} bytes) wraps around the address space")]
    Wraps { address: u64, len: usize },
}

/// Group `ranges` (address, length) into spans: sorted by address, each
/// range joins the current span if it starts in the page where that span
/// starts, else opens a new one. Empty ranges belong to no span. With
/// `disjoint`, overlapping ranges are an error (writes); without, they
/// share a span (reads).
pub fn spans(ranges: &[(u64, usize)], disjoint: bool) -> Result<Vec<Span>, SpanError> {
    let mut order: Vec<usize> = (0..ranges.len()).filter(|&i| ranges[i].1 > 0).collect();
    order.sort_by_key(|&i| ranges[i].0);
    let mut out: Vec<Span> = Vec::new();
    for i in order {
        let (address, len) = ranges[i];
        let end = address
            .checked_add(len as u64)
            .ok_or(SpanError::Wraps { address, len })?;
        match out.last_mut() {
            Some(span) if address < (span.start & !(PAGE - 1)) + PAGE => {
                if disjoint && address < span.end() {
                    return Err(SpanError::Overlap { address });
                }
                span.len = (span.end().max(end) - span.start) as usize;
                span.members.push(i);
            }
            _ => out.push(Span {
                start: address,
                len,
                members: vec![i],
            }),
        }
    }
    Ok(out)
}

/// The first write of a span whose bytes are not the expected ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Its index in the writes.
    pub write: usize,
    pub found: Vec<u8>,
}

/// The bytes `span` gets: `current` (what it holds) with each member
/// write's new bytes in place, or the first member whose bytes are not
/// its expected ones (then nothing is to be written). A write whose
/// expected and new lengths differ is a mismatch too.
pub fn splice(span: &Span, current: &[u8], writes: &[Write]) -> Result<Vec<u8>, Mismatch> {
    let mut out = current.to_vec();
    for &i in &span.members {
        let w = &writes[i];
        let at = (w.address - span.start) as usize;
        let found = current.get(at..at + w.expected.len()).unwrap_or_default();
        if found != w.expected.as_slice() || w.new.len() != w.expected.len() {
            return Err(Mismatch {
                write: i,
                found: found.to_vec(),
            });
        }
        out[at..at + w.new.len()].copy_from_slice(&w.new);
    }
    Ok(out)
}

/// The bytes of `range` (address, length) inside a span read as `bytes`.
pub fn slice_of<'b>(span: &Span, bytes: &'b [u8], range: (u64, usize)) -> Option<&'b [u8]> {
    let at = usize::try_from(range.0.checked_sub(span.start)?).ok()?;
    bytes.get(at..at.checked_add(range.1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn w(address: u64, expected: &[u8], new: &[u8]) -> Write {
        Write {
            address,
            expected: expected.to_vec(),
            new: new.to_vec(),
        }
    }

    #[test]
    fn writes_in_one_page_share_a_span() {
        let ranges = [(0x1010, 2), (0x1000, 8), (0x1ff8, 16), (0x2000, 1)];
        let s = spans(&ranges, true).unwrap();
        assert_eq!(
            s,
            vec![
                // The one starting at 0x1ff8 runs past the page: the span too.
                Span {
                    start: 0x1000,
                    len: 0x1008,
                    members: vec![1, 0, 2]
                },
                Span {
                    start: 0x2000,
                    len: 1,
                    members: vec![3]
                },
            ]
        );
    }

    #[test]
    fn overlapping_writes_are_refused_reads_are_merged() {
        let ranges = [(0x1000, 8), (0x1004, 2)];
        assert_eq!(spans(&ranges, true), Err(SpanError::Overlap { address: 0x1004 }));
        let s = spans(&ranges, false).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].start, s[0].len), (0x1000, 8));
    }

    #[test]
    fn wrapping_range_is_refused() {
        assert!(matches!(
            spans(&[(u64::MAX - 1, 8)], true),
            Err(SpanError::Wraps { .. })
        ));
    }

    #[test]
    fn splice_changes_only_the_writes_bytes() {
        let writes = [w(0x101, &[0x90], &[0xf8]), w(0x104, &[1, 2], &[3, 4])];
        let s = &spans(&[(0x101, 1), (0x104, 2)], true).unwrap()[0];
        let current = [0x90, 7, 7, 1, 2];
        assert_eq!(splice(s, &current, &writes), Ok(vec![0xf8, 7, 7, 3, 4]));
    }

    #[test]
    fn splice_names_the_first_mismatch() {
        let writes = [w(0x100, &[0x90], &[0xf8]), w(0x102, &[0x90], &[0xeb])];
        let s = &spans(&[(0x100, 1), (0x102, 1)], true).unwrap()[0];
        assert_eq!(
            splice(s, &[0x90, 0, 0xcc], &writes),
            Err(Mismatch {
                write: 1,
                found: vec![0xcc]
            })
        );
        let unequal = [w(0x100, &[0x90], &[0xf8, 0])];
        let s = &spans(&[(0x100, 1)], true).unwrap()[0];
        assert!(splice(s, &[0x90], &unequal).is_err());
    }

    proptest! {
        /// Disjoint writes: every write is in exactly one span, inside it;
        /// spans are disjoint and sorted; a span's members start in its
        /// first page; splicing the expected bytes gives the new bytes at
        /// each write and leaves every other byte alone.
        #[test]
        fn spans_cover_disjoint_writes(
            starts in proptest::collection::btree_set(0u64..40_000, 0..60),
            lens in proptest::collection::vec(1usize..12, 60),
        ) {
            // Disjoint ranges from sorted starts, each cut short of the next.
            let starts: Vec<u64> = starts.into_iter().map(|s| s * 3).collect();
            let ranges: Vec<(u64, usize)> = starts
                .iter()
                .enumerate()
                .map(|(i, &s)| {
                    let room = starts.get(i + 1).map_or(usize::MAX, |&n| (n - s) as usize);
                    (s, lens[i].min(room))
                })
                .collect();
            let s = spans(&ranges, true).unwrap();
            let mut seen = vec![0; ranges.len()];
            for (k, span) in s.iter().enumerate() {
                if k > 0 {
                    prop_assert!(s[k - 1].end() <= span.start);
                }
                for &i in &span.members {
                    seen[i] += 1;
                    let (a, l) = ranges[i];
                    prop_assert!(a >= span.start && a + l as u64 <= span.end());
                    prop_assert!(a < (span.start & !(PAGE - 1)) + PAGE);
                }
            }
            prop_assert!(seen.iter().all(|&n| n == 1));
            let writes: Vec<Write> = ranges
                .iter()
                .map(|&(a, l)| w(a, &vec![0xaa; l], &vec![0x55; l]))
                .collect();
            for span in &s {
                let current = vec![0xaa; span.len];
                let out = splice(span, &current, &writes).unwrap();
                for (off, &b) in out.iter().enumerate() {
                    let addr = span.start + off as u64;
                    let written = span
                        .members
                        .iter()
                        .any(|&i| addr >= ranges[i].0 && addr < ranges[i].0 + ranges[i].1 as u64);
                    prop_assert_eq!(b, if written { 0x55 } else { 0xaa });
                }
            }
        }
    }
}
