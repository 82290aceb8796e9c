//! The `.hotpatch` record syntax. Pure.

/// One record of a patch description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Target { image: String, build_id: Option<String> },
    Replace { target: String, replacement: String },
    Ref { symbol: String, pointer: String },
    Orig { symbol: String, pointer: String },
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
            },
            ("orig", [symbol, pointer]) => Record::Orig {
                symbol: symbol.clone(),
                pointer: pointer.clone(),
            },
            ("target" | "replace" | "ref" | "orig", _) => return Err(err("wrong number of fields")),
            _ => return Err(err("unknown record kind")),
        };
        records.push(record);
    }
    Ok(records)
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
                    pointer: "p_fees".into()
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

    proptest! {
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
