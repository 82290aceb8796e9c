//! Write a `hotpatch` patch library in Rust.
//!
//! A patch is a `cdylib` whose `.hotpatch` section says what it replaces;
//! these macros emit the same records as `include/hotpatch.h` does for C.
//!
//! ```text
//! use hotpatch_patch::{original, replace, target};
//! target!("fee-server", "");
//! original!(compute_fee, ORIG_COMPUTE_FEE);
//!
//! #[unsafe(no_mangle)]
//! pub static mut ORIG_COMPUTE_FEE: Option<extern "C" fn(i64) -> i64> = None;
//!
//! #[unsafe(no_mangle)]
//! pub extern "C" fn compute_fee_fixed(amount: i64) -> i64 { amount / 100 }
//! replace!(compute_fee, compute_fee_fixed);
//! ```
//!
//! Replacements and pointers must be exported (`#[unsafe(no_mangle)]`,
//! `pub`); pointer variables must be 8 bytes (`Option<fn>` or `*mut T`)
//! and are filled in before any replacement goes live.
//!
//! Names are recorded as written: `stringify!` never expands anything, and
//! no Rust macro can rename an identifier the way a C `#define` does, so
//! the rule `include/hotpatch.h` has to spell out (target names are never
//! macro-expanded) holds here by construction.

#![no_std]

/// Copy a `&str` into a NUL-terminated byte array of length `N`
/// (`N` = `s.len() + 1`). Used by the macros in const context.
#[doc(hidden)]
pub const fn record<const N: usize>(s: &str) -> [u8; N] {
    let bytes = s.as_bytes();
    assert!(bytes.len() + 1 == N, "record length mismatch");
    let mut out = [0u8; N];
    let mut i = 0;
    while i < bytes.len() {
        out[i] = bytes[i];
        i += 1;
    }
    out
}

/// Emit one record string into the `.hotpatch` section.
#[doc(hidden)]
#[macro_export]
macro_rules! __record {
    ($text:expr) => {
        const _: () = {
            const TEXT: &str = concat!("hotpatch-v1 ", $text);
            #[used]
            #[unsafe(link_section = ".hotpatch")]
            static RECORD: [u8; TEXT.len() + 1] = $crate::record::<{ TEXT.len() + 1 }>(TEXT);
        };
    };
}

/// The image this patch is for, and its build-id in hex (`""` = any).
#[macro_export]
macro_rules! target {
    ($image:literal, $build_id:literal) => {
        $crate::__record!(concat!("target ", $image, " ", $build_id));
    };
}

/// Every call to target function `$target` goes to `$replacement`.
/// `$target` may be a string literal (`"file.c:name"`, `"0x1234"`).
#[macro_export]
macro_rules! replace {
    ($target:literal, $replacement:ident) => {
        $crate::__record!(concat!("replace ", $target, " ", stringify!($replacement)));
    };
    ($target:ident, $replacement:ident) => {
        $crate::__record!(concat!(
            "replace ",
            stringify!($target),
            " ",
            stringify!($replacement)
        ));
    };
}

/// Fill pointer variable `$pointer` with the address of target symbol `$symbol`.
#[macro_export]
macro_rules! reference {
    ($symbol:literal, $pointer:ident) => {
        $crate::__record!(concat!("ref ", $symbol, " ", stringify!($pointer)));
    };
    ($symbol:ident, $pointer:ident) => {
        $crate::__record!(concat!(
            "ref ",
            stringify!($symbol),
            " ",
            stringify!($pointer)
        ));
    };
}

/// Fill pointer variable `$pointer` with the original code of `$function`,
/// callable while it is patched.
#[macro_export]
macro_rules! original {
    ($function:literal, $pointer:ident) => {
        $crate::__record!(concat!("orig ", $function, " ", stringify!($pointer)));
    };
    ($function:ident, $pointer:ident) => {
        $crate::__record!(concat!(
            "orig ",
            stringify!($function),
            " ",
            stringify!($pointer)
        ));
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn record_is_nul_terminated() {
        const R: [u8; 4] = crate::record::<4>("abc");
        assert_eq!(&R, b"abc\0");
    }
}
