//! `key=value` fields of the lines test targets print
//! (`ready f=0x401136 g=0x401150`, `call 11 f=56 g=23131`).

/// The hexadecimal field `key` (with its `=`, say `"f="`) of `line`, with
/// or without `0x`; panics naming the line if it is missing or bad.
pub fn hex_field(line: &str, key: &str) -> u64 {
    let v = field(line, key);
    u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap_or_else(|_| panic!("bad {key} in {line:?}"))
}

/// The decimal field `key` of `line`; panics naming the line if it is
/// missing or bad.
pub fn num_field(line: &str, key: &str) -> i64 {
    field(line, key)
        .parse()
        .unwrap_or_else(|_| panic!("bad {key} in {line:?}"))
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_found_by_key() {
        let l = "ready f=0x401136 g=40115a n=-3";
        assert_eq!(hex_field(l, "f="), 0x401136);
        assert_eq!(hex_field(l, "g="), 0x40115a);
        assert_eq!(num_field(l, "n="), -3);
    }

    #[test]
    #[should_panic(expected = "no x= in")]
    fn a_missing_field_panics_naming_it() {
        hex_field("ready f=1", "x=");
    }
}
