//! `hotpatch prepare`: rewrite gcc's two 1-byte entry nops (`90 90`) into
//! one 2-byte nop (`66 90`) in a copy of an image, so no thread can ever be
//! between them. Nothing else in the file changes.

use crate::Image;
use crate::arch::x86_64::EntryNops;
use crate::patchability::{Class, survey};

/// The rewritten file and what was rewritten.
#[derive(Debug, Clone)]
pub struct PreparedCopy {
    pub data: Vec<u8>,
    /// Addresses of the entry nops that were rewritten, ascending.
    pub rewritten: Vec<u64>,
}

/// Rewrite every prepared entry with gcc's `90 90` into `66 90`.
pub fn prepare(image: &Image) -> PreparedCopy {
    let mut data = image.data().to_vec();
    let mut rewritten = Vec::new();
    for f in survey(image).functions {
        let Class::Prepared { flip, .. } = &f.class else {
            continue;
        };
        if flip.original != EntryNops::TwoNop1.bytes() {
            continue;
        }
        if let Some(range) = image.file_range(flip.short_jump_at, 2)
            && data[range.clone()] == EntryNops::TwoNop1.bytes()
        {
            data[range].copy_from_slice(&EntryNops::Nop2.bytes());
            rewritten.push(flip.short_jump_at);
        }
    }
    PreparedCopy { data, rewritten }
}
