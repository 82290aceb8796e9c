//! Names and other text from patches and targets, cut to a readable
//! length for messages (pure). A symbol name can be any length — a
//! patch's records or a target's symbol table may hold a 1 MiB one — and
//! a message quoting it whole is one unreadable line. The start and the
//! end are kept (that is where names differ) with the full length.

use std::borrow::Cow;

/// The longest name quoted whole in a message, in bytes.
pub const NAME_MAX: usize = 200;

/// `text` if it is at most `max` bytes; otherwise its start and its end
/// (on character boundaries) around `…`, then "(N bytes)". The result is
/// at most `max` + 30 bytes.
pub fn shorten(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let head_len = floor_boundary(text, max * 2 / 3);
    let tail_start = ceil_boundary(text, text.len() - (max - head_len).min(text.len()));
    let tail_start = tail_start.max(head_len);
    Cow::Owned(format!(
        "{}…{} ({} bytes)",
        &text[..head_len],
        &text[tail_start..],
        text.len()
    ))
}

/// [`shorten`] to [`NAME_MAX`]: for symbol and image names in messages.
pub fn name(text: &str) -> Cow<'_, str> {
    shorten(text, NAME_MAX)
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn short_names_are_unchanged() {
        assert_eq!(name("compute_fee"), "compute_fee");
        assert!(matches!(name(&"x".repeat(NAME_MAX)), Cow::Borrowed(_)));
    }

    #[test]
    fn a_mebibyte_name_keeps_its_ends_and_says_its_length() {
        let long = format!("start_{}_end", "A".repeat(1 << 20));
        let short = name(&long);
        assert!(
            short.starts_with("start_AAA") && short.contains("AAA_end (1048586 bytes)"),
            "{short}"
        );
        assert!(short.len() <= NAME_MAX + 30, "{}", short.len());
    }

    proptest! {
        #[test]
        fn bounded_and_faithful(text in "\\PC{0,600}", max in 8usize..300) {
            let out = shorten(&text, max);
            if text.len() <= max {
                prop_assert_eq!(out.as_ref(), text.as_str());
            } else {
                prop_assert!(out.len() <= max + 30, "{} > {}", out.len(), max + 30);
                let len_suffix = format!(" ({} bytes)", text.len());
                let body = out.strip_suffix(&len_suffix).expect("the length at the end");
                // Some `…` in the body splits it into a start and an end of
                // `text` (the text itself may contain `…` too).
                let faithful = body.match_indices('…').any(|(i, e)| {
                    text.starts_with(&body[..i]) && text.ends_with(&body[i + e.len()..])
                });
                prop_assert!(faithful, "{:?}", body);
            }
        }
    }
}
