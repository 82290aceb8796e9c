//! The `.hotpatch` record syntax. Pure.

/// One record of a patch description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Target {
        image: String,
        build_id: Option<String>,
    },
    Replace {
        target: String,
        replacement: String,
    },
    /// `pointer` ← the address of `symbol` + `addend`.
    Ref {
        symbol: String,
        pointer: String,
        addend: i64,
    },
    Orig {
        symbol: String,
        pointer: String,
    },
    /// The 8 zero bytes at `site` ← the address of `symbol` + `addend` −
    /// the address of `base` (a symbol of the patch).
    Rel64 {
        symbol: String,
        site: String,
        addend: i64,
        base: String,
    },
}

/// A record that cannot be read; `offset` is within the section.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("record at offset {offset:#x} ({:?}): {what}", crate::shorten::name(text))]
pub struct RecordError {
    pub offset: usize,
    pub text: String,
    pub what: String,
}

const MAGIC: &str = "hotpatch-v1";

/// Parse the section's bytes: NUL-terminated records, empty strings
/// (alignment padding) skipped.
pub fn parse_records(data: &[u8]) -> Result<Vec<Record>, RecordError> {
    let mut records = Vec::new();
    let mut offset = 0;
    for raw in data.split(|&b| b == 0) {
        let here = offset;
        offset += raw.len() + 1;
        if raw.is_empty() {
            continue;
        }
        let err = |what: &str| RecordError {
            offset: here,
            text: String::from_utf8_lossy(raw).into_owned(),
            what: what.to_string(),
        };
        let text = std::str::from_utf8(raw).map_err(|_| err("not UTF-8"))?;
        let mut words = text.split_whitespace();
        match words.next() {
            Some(MAGIC) => {}
            Some(w) if w.starts_with("hotpatch-v") => {
                return Err(err("a newer record version; upgrade hotpatch"));
            }
            _ => return Err(err("does not start with `hotpatch-v1`")),
        }
        let kind = words.next().ok_or_else(|| err("no record kind"))?;
        let fields: Vec<String> = words.map(str::to_string).collect();
        let record = match (kind, fields.as_slice()) {
            ("target", [image]) => Record::Target {
                image: image.clone(),
                build_id: None,
            },
            ("target", [image, id]) => {
                if id.is_empty() || id.len() % 2 != 0 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(err("the build-id must be hex"));
                }
                Record::Target {
                    image: image.clone(),
                    build_id: Some(id.to_ascii_lowercase()),
                }
            }
            ("replace", [target, replacement]) => Record::Replace {
                target: target.clone(),
                replacement: replacement.clone(),
            },
            ("ref", [symbol, pointer]) => Record::Ref {
                symbol: symbol.clone(),
                pointer: pointer.clone(),
                addend: 0,
            },
            ("ref", [symbol, pointer, addend]) => Record::Ref {
                symbol: symbol.clone(),
                pointer: pointer.clone(),
                addend: parse_addend(addend).map_err(|what| err(&what))?,
            },
            ("orig", [symbol, pointer]) => Record::Orig {
                symbol: symbol.clone(),
                pointer: pointer.clone(),
            },
            ("rel64", [symbol, site, addend, base]) => Record::Rel64 {
                symbol: symbol.clone(),
                site: site.clone(),
                addend: parse_addend(addend).map_err(|what| err(&what))?,
                base: base.clone(),
            },
            ("target" | "replace" | "ref" | "orig" | "rel64", _) => {
                return Err(err("wrong number of fields"));
            }
            _ => return Err(err("unknown record kind")),
        };
        records.push(record);
    }
    Ok(records)
}

/// An addend: a decimal or `0x` hexadecimal number, optionally signed
/// (`-4`, `+8`, `0x10`, `-0x10`), within the range of an `i64`.
pub fn parse_addend(text: &str) -> Result<i64, String> {
    let (negative, magnitude) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let (digits, radix) = match magnitude
        .strip_prefix("0x")
        .or_else(|| magnitude.strip_prefix("0X"))
    {
        Some(hex) => (hex, 16),
        None => (magnitude, 10),
    };
    // (`from_str_radix` would take a second sign.)
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(format!(
            "addend `{}` is not a number (decimal or 0x hex, optionally signed)",
            crate::shorten::name(text)
        ));
    }
    let out_of_range = || {
        format!(
            "addend `{}` does not fit in 64 signed bits",
            crate::shorten::name(text)
        )
    };
    let value = u64::from_str_radix(digits, radix).map_err(|_| out_of_range())?;
    if negative {
        0i64.checked_sub_unsigned(value).ok_or_else(out_of_range)
    } else {
        i64::try_from(value).map_err(|_| out_of_range())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_header_output() {
        let data = b"hotpatch-v1 ref server.c:fees p_fees\0hotpatch-v1 replace f f_fixed\0\0\0hotpatch-v1 target fee-server \0hotpatch-v1 target libx.so.1 0A1b\0hotpatch-v1 orig f orig_f\0";
        let r = parse_records(data).unwrap();
        assert_eq!(
            r,
            vec![
                Record::Ref {
                    symbol: "server.c:fees".into(),
                    pointer: "p_fees".into(),
                    addend: 0
                },
                Record::Replace {
                    target: "f".into(),
                    replacement: "f_fixed".into()
                },
                Record::Target {
                    image: "fee-server".into(),
                    build_id: None
                },
                Record::Target {
                    image: "libx.so.1".into(),
                    build_id: Some("0a1b".into())
                },
                Record::Orig {
                    symbol: "f".into(),
                    pointer: "orig_f".into()
                },
            ]
        );
    }

    #[test]
    fn names_the_bad_record() {
        let e = parse_records(b"hotpatch-v1 replace f g\0hotpatch-v1 replace f\0").unwrap_err();
        assert_eq!((e.offset, e.what.as_str()), (24, "wrong number of fields"));
        assert!(parse_records(b"junk\0").is_err());
        assert!(parse_records(b"hotpatch-v1 frobnicate a b\0").is_err());
        assert!(
            parse_records(b"hotpatch-v2 replace a b\0")
                .unwrap_err()
                .what
                .contains("newer")
        );
        assert!(parse_records(b"hotpatch-v1 target x zz\0").is_err());
        assert!(parse_records(b"hotpatch-v1 \xff\xfe\0").is_err());
        assert_eq!(parse_records(b"").unwrap(), vec![]);
    }

    #[test]
    fn rel64_and_ref_with_an_addend() {
        let data = b"hotpatch-v1 rel64 counter site_counter 0 anchor\0hotpatch-v1 rel64 file.c:helper s -4 __hotpatch_got\0hotpatch-v1 rel64 0x4010 s 0x10 b\0hotpatch-v1 ref counter p -0x8\0hotpatch-v1 ref counter p +8\0";
        assert_eq!(
            parse_records(data).unwrap(),
            vec![
                Record::Rel64 {
                    symbol: "counter".into(),
                    site: "site_counter".into(),
                    addend: 0,
                    base: "anchor".into()
                },
                Record::Rel64 {
                    symbol: "file.c:helper".into(),
                    site: "s".into(),
                    addend: -4,
                    base: "__hotpatch_got".into()
                },
                Record::Rel64 {
                    symbol: "0x4010".into(),
                    site: "s".into(),
                    addend: 16,
                    base: "b".into()
                },
                Record::Ref {
                    symbol: "counter".into(),
                    pointer: "p".into(),
                    addend: -8
                },
                Record::Ref {
                    symbol: "counter".into(),
                    pointer: "p".into(),
                    addend: 8
                },
            ]
        );
    }

    #[test]
    fn bad_rel64_and_ref_records() {
        for (text, what) in [
            ("hotpatch-v1 rel64 counter site 0", "wrong number of fields"),
            (
                "hotpatch-v1 rel64 counter site 0 base extra",
                "wrong number of fields",
            ),
            ("hotpatch-v1 rel64", "wrong number of fields"),
            ("hotpatch-v1 ref counter p 0 1", "wrong number of fields"),
            ("hotpatch-v1 rel64 counter site four base", "not a number"),
            ("hotpatch-v1 rel64 counter site 0x base", "not a number"),
            ("hotpatch-v1 rel64 counter site -+4 base", "not a number"),
            ("hotpatch-v1 rel64 counter site 0x1g base", "not a number"),
            ("hotpatch-v1 rel64 counter site 1.5 base", "not a number"),
            ("hotpatch-v1 rel64 counter site - base", "not a number"),
            ("hotpatch-v1 ref counter p 12abc", "not a number"),
            (
                "hotpatch-v1 rel64 counter site 9223372036854775808 base",
                "64 signed bits",
            ),
            (
                "hotpatch-v1 rel64 counter site 0x8000000000000000 base",
                "64 signed bits",
            ),
            (
                "hotpatch-v1 rel64 counter site -0x8000000000000001 base",
                "64 signed bits",
            ),
            ("hotpatch-v1 ref counter p 0x10000000000000000", "64 signed bits"),
        ] {
            let data = format!("{text}\0");
            let e = parse_records(data.as_bytes()).unwrap_err();
            assert!(e.what.contains(what), "{text}: {e}");
            assert_eq!(e.offset, 0);
        }
    }

    #[test]
    fn addends_at_the_edges() {
        assert_eq!(parse_addend("9223372036854775807"), Ok(i64::MAX));
        assert_eq!(parse_addend("-9223372036854775808"), Ok(i64::MIN));
        assert_eq!(parse_addend("-0x8000000000000000"), Ok(i64::MIN));
        assert_eq!(parse_addend("0x7fffffffffffffff"), Ok(i64::MAX));
        assert_eq!(parse_addend("0XfF"), Ok(255));
        assert_eq!(parse_addend("-0"), Ok(0));
        assert_eq!(parse_addend("007"), Ok(7));
        assert!(parse_addend("").is_err());
        assert!(parse_addend("--1").is_err());
        assert!(parse_addend(" 1").is_err());
    }

    proptest! {
        #[test]
        fn addends_round_trip(n in any::<i64>()) {
            prop_assert_eq!(parse_addend(&n.to_string()), Ok(n));
            let hex = if n < 0 { format!("-0x{:x}", n.unsigned_abs()) } else { format!("0x{n:x}") };
            prop_assert_eq!(parse_addend(&hex), Ok(n));
        }

        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_records(&data);
        }

        #[test]
        fn round_trips(target in "[a-z_][a-z0-9_.:]{0,20}", replacement in "[a-z_][a-z0-9_]{0,20}") {
            let text = format!("hotpatch-v1 replace {target} {replacement}\0");
            prop_assert_eq!(
                parse_records(text.as_bytes()).unwrap(),
                vec![Record::Replace { target, replacement }]
            );
        }
    }
}
