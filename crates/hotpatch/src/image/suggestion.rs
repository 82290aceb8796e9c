//! What a name that names nothing may have meant. Pure: ranks names
//! given to it; the error path of a lookup gives it the image's names (and
//! what the debug info says, see [`super::inlined`]).
//!
//! Four kinds of answer, in the order a message gives them:
//! - the same function under another form of its name: a C++ name given
//!   demangled (`ns::f`, looked up mangled: `_ZN2ns1fEv`) or mangled
//!   wrongly, a Rust name with another hash or the other mangling (legacy
//!   `_ZN…17h<hash>E` and v0 `_R…`), and Rust's two path forms of an
//!   inherent method, `<a::B>::f` (v0) and `a::B::f` (legacy); for
//!   `file.c:name`, the name itself when some other file has it;
//! - compiler clones of it (`f.constprop.0`, `f.isra.0`, `f.part.0`), all
//!   the image has when the compiler copied or split `f` away;
//! - near names, by edit distance;
//! - "inlined everywhere" with its callers, from DWARF.

use super::symbol::{clone_of, demangle};
use crate::shorten::name;
use std::collections::HashSet;

/// At most this many names of each kind are suggested.
pub const SHOWN: usize = 5;

/// A name to suggest, with its demangled form where it has one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Suggested {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub demangled: Option<String>,
}

impl Suggested {
    fn of(raw: &str) -> Suggested {
        Suggested {
            name: raw.to_string(),
            demangled: demangled(raw).filter(|d| d != raw),
        }
    }
}

impl std::fmt::Display for Suggested {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.demangled {
            Some(d) => write!(f, "`{}` ({})", name(&self.name), name(d)),
            None => write!(f, "`{}`", name(&self.name)),
        }
    }
}

/// What a name not found may have meant. Empty: nothing to say.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Hint {
    /// The same function or variable, named in another form; for
    /// `file.c:name`, `name` where it is not that file's static.
    pub other_forms: Vec<Suggested>,
    /// Compiler clones of a function of that name.
    pub clones: Vec<String>,
    /// Near names, nearest first.
    pub near: Vec<Suggested>,
    /// The debug info has a function of that name inlined into every
    /// caller and no code of its own: those callers (`Some(empty)`: the
    /// callers have no names).
    pub inlined_into: Option<Vec<String>>,
}

impl Hint {
    pub fn is_empty(&self) -> bool {
        self.other_forms.is_empty()
            && self.clones.is_empty()
            && self.near.is_empty()
            && self.inlined_into.is_none()
    }
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    items.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

/// Each part starts with `; `, to follow the error's own text.
impl std::fmt::Display for Hint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(callers) = &self.inlined_into {
            write!(
                f,
                "; debug info says it was inlined everywhere: patch its callers"
            )?;
            if !callers.is_empty() {
                let mut shown: Vec<String> = callers
                    .iter()
                    .take(SHOWN)
                    .map(|c| format!("`{}`", name(c)))
                    .collect();
                if callers.len() > SHOWN {
                    shown.push(format!("{} more", callers.len() - SHOWN));
                }
                write!(f, " ({})", shown.join(", "))?;
            }
        }
        if !self.other_forms.is_empty() {
            write!(f, "; the same name in another form: {}", list(&self.other_forms))?;
        }
        if !self.clones.is_empty() {
            let clones: Vec<String> = self.clones.iter().map(|c| format!("`{}`", name(c))).collect();
            write!(
                f,
                "; only compiler clones of it (each a function of its own): {}",
                clones.join(", ")
            )?;
        }
        if !self.near.is_empty() {
            write!(f, "; near names: {}", list(&self.near))?;
        }
        Ok(())
    }
}

/// A mangled name (Rust legacy or v0, C++) demangled: Rust's without the
/// hash, C++'s in full.
pub fn demangled(raw: &str) -> Option<String> {
    if let Some(d) = demangle(raw) {
        return Some(d);
    }
    if !raw.starts_with("_Z") {
        return None;
    }
    let symbol = cpp_demangle::Symbol::new(raw).ok()?;
    symbol.demangle().ok()
}

/// What names one function whatever the form: the demangled path without
/// hash, C++ parameters or Rust generic arguments, and with a leading
/// inherent `<a::B>::` written `a::B::`. `None` for a name that is neither
/// mangled nor a path.
pub fn key(raw: &str) -> Option<String> {
    let path = if let Some(d) = demangle(raw) {
        d
    } else if raw.starts_with("_Z") {
        let symbol = cpp_demangle::Symbol::new(raw).ok()?;
        let options = cpp_demangle::DemangleOptions::new().no_params().no_return_type();
        symbol.demangle_with_options(&options).ok()?
    } else if raw.contains("::") {
        raw.to_string()
    } else {
        // A plain C name is its own key: a C++ `foo()` is `_Z3foov`.
        return Some(raw.to_string());
    };
    Some(normal_path(&path))
}

/// `<a::B>::f` → `a::B::f` (not `<a::B as T>::f`, a trait's method), and
/// Rust generic arguments `::<…>` dropped.
fn normal_path(path: &str) -> String {
    let mut p = path.to_string();
    if p.starts_with('<')
        && let Some(close) = matching_close(&p)
        && p[close + 1..].starts_with("::")
        && !p[1..close].contains(" as ")
    {
        p = format!("{}{}", &p[1..close], &p[close + 1..]);
    }
    while let Some(at) = p.find("::<") {
        let Some(close) = matching_close(&p[at + 2..]).map(|c| c + at + 2) else {
            break;
        };
        p.replace_range(at..=close, "");
    }
    p
}

/// The index of the `>` that closes the `<` at the start of `s`.
fn matching_close(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, b) in s.bytes().enumerate() {
        match b {
            b'<' => depth += 1,
            b'>' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// The largest edit distance suggested for a query this long.
pub fn max_distance(len: usize) -> usize {
    match len {
        0..=3 => 1,
        4..=7 => 2,
        _ => 3,
    }
}

/// The Levenshtein distance of `a` and `b` (bytes), if it is at most
/// `max`: only the band of width `2 max + 1` around the diagonal is
/// computed.
pub fn distance_within(a: &str, b: &str, max: usize) -> Option<usize> {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len().abs_diff(b.len()) > max {
        return None;
    }
    let big = max + 1;
    let mut prev: Vec<usize> = (0..=b.len()).map(|j| if j <= max { j } else { big }).collect();
    let mut cur = vec![big; b.len() + 1];
    for i in 1..=a.len() {
        let lo = i.saturating_sub(max).max(1);
        let hi = (i + max).min(b.len());
        cur.fill(big);
        cur[0] = if i <= max { i } else { big };
        let mut row_min = cur[0];
        for j in lo..=hi {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let v = (prev[j - 1] + cost).min(prev[j] + 1).min(cur[j - 1] + 1).min(big);
            cur[j] = v;
            row_min = row_min.min(v);
        }
        if row_min > max {
            return None;
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    let d = prev[b.len()];
    (d <= max).then_some(d)
}

/// Rank the image's `names` (raw symbol names, in any order, repeats
/// allowed) for `query`, a name [`super::lookup`] found nothing for
/// (`file.c:name` is ranked by its name). The inlined part is left empty.
pub fn rank<'n>(query: &str, names: impl IntoIterator<Item = &'n str>) -> Hint {
    let plain = plain_name(query);
    // `file.c:name` where `name` is there, in other files or exported.
    let qualified = plain.len() < query.len();
    let query = plain;
    let wanted = key(query);
    // Only names that contain the key's last identifier can have that key
    // (both manglings copy identifiers as they are): the rest is not
    // demangled unless near names are searched among paths.
    let last = wanted
        .as_deref()
        .map(|k| k.rsplit("::").next().unwrap_or(k).to_string())
        .filter(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
    let path_query = query.contains("::");
    let max = max_distance(query.len());
    let mut seen: HashSet<&str> = HashSet::new();
    let mut hint = Hint::default();
    let mut near: Vec<(usize, &str)> = Vec::new();
    for raw in names {
        if !seen.insert(raw) {
            continue;
        }
        if raw == query {
            if qualified {
                hint.other_forms.push(Suggested::of(raw));
            }
            continue;
        }
        let mangled = raw.starts_with("_Z") || raw.starts_with("_R");
        let raw_key = if mangled && (path_query || last.as_deref().is_some_and(|l| raw.contains(l))) {
            key(raw)
        } else {
            None
        };
        if raw_key.is_some() && raw_key == wanted {
            hint.other_forms.push(Suggested::of(raw));
            continue;
        }
        if clone_of(raw).is_some_and(|(base, _)| base == query) {
            hint.clones.push(raw.to_string());
            continue;
        }
        let by_raw = distance_within(query, raw, max);
        let by_key = raw_key
            .as_deref()
            .filter(|_| path_query)
            .and_then(|k| distance_within(query, k, max));
        if let Some(d) = by_raw.into_iter().chain(by_key).min() {
            near.push((d, raw));
        }
    }
    hint.other_forms.sort_by(|a, b| a.name.cmp(&b.name));
    hint.other_forms.truncate(SHOWN);
    hint.clones.sort();
    hint.clones.truncate(SHOWN);
    near.sort();
    hint.near = near
        .into_iter()
        .take(SHOWN)
        .map(|(_, n)| Suggested::of(n))
        .collect();
    hint
}

/// Everything to say about `query`, which names nothing in an image with
/// symbol `names` and sections `section` (for the debug info; see
/// [`super::inlined`]).
pub fn hint<'n, 'd>(
    query: &str,
    names: impl IntoIterator<Item = &'n str>,
    section: impl Fn(&str) -> Option<&'d [u8]>,
) -> Hint {
    let mut hint = rank(query, names);
    hint.inlined_into = super::inlined::inlined_everywhere(section, plain_name(query));
    hint
}

/// The name of `file.c:name`; other queries as they are.
fn plain_name(query: &str) -> &str {
    match query.rsplit_once(':') {
        Some((file, n)) if !file.ends_with(':') && !n.is_empty() && !query.contains("::") => n,
        _ => query,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(s: &[Suggested]) -> Vec<&str> {
        s.iter().map(|x| x.name.as_str()).collect()
    }

    #[test]
    fn distances() {
        assert_eq!(distance_within("compute_fee", "compute_fee", 3), Some(0));
        assert_eq!(distance_within("compute_fe", "compute_fee", 3), Some(1));
        assert_eq!(distance_within("compute_fee", "compute_eef", 3), Some(2));
        assert_eq!(distance_within("kitten", "sitting", 3), Some(3));
        assert_eq!(distance_within("kitten", "sitting", 2), None);
        assert_eq!(distance_within("a", "abcdef", 3), None);
        assert_eq!(distance_within("", "ab", 2), Some(2));
    }

    /// The textbook dynamic programme, for the property test.
    fn levenshtein(a: &[u8], b: &[u8]) -> usize {
        let mut prev: Vec<usize> = (0..=b.len()).collect();
        for i in 1..=a.len() {
            let mut cur = vec![i; b.len() + 1];
            for j in 1..=b.len() {
                cur[j] = (prev[j - 1] + usize::from(a[i - 1] != b[j - 1]))
                    .min(prev[j] + 1)
                    .min(cur[j - 1] + 1);
            }
            prev = cur;
        }
        prev[b.len()]
    }

    proptest! {
        #[test]
        fn banded_distance_agrees_with_the_full_one(a in "[abc_]{0,12}", b in "[abc_]{0,12}", max in 0usize..5) {
            let full = levenshtein(a.as_bytes(), b.as_bytes());
            prop_assert_eq!(distance_within(&a, &b, max), (full <= max).then_some(full));
        }
    }

    #[test]
    fn near_names_nearest_first_at_most_five() {
        let image = [
            "compute_fee",
            "compute_fees",
            "compute_tax",
            "main",
            "compute_fee_v2",
            "compute_feed",
            "compute_free",
            "compute_fe",
            "commute_fee",
        ];
        let hint = rank("compute_fe", image);
        // Distance 1, then 2 by name; `compute_tax` (3) is sixth.
        assert_eq!(
            names(&hint.near),
            [
                "compute_fee",
                "commute_fee",
                "compute_feed",
                "compute_fees",
                "compute_free"
            ]
        );
        assert!(rank("zzzzzz", image).is_empty());
        // The query itself is never suggested.
        assert!(!names(&rank("compute_fe", ["compute_fe"]).near).contains(&"compute_fe"));
    }

    #[test]
    fn clones_of_the_name() {
        let hint = rank(
            "parse",
            [
                "parse.constprop.0",
                "parse.cold",
                "parser",
                "parse.part.1",
                "unparse.isra.0",
            ],
        );
        assert_eq!(hint.clones, ["parse.cold", "parse.constprop.0", "parse.part.1"]);
        assert_eq!(names(&hint.near), ["parser"]);
    }

    #[test]
    fn cpp_demangled_and_mangled() {
        // `ns::f` written demangled: the image has it mangled.
        let image = ["_ZN2ns1fEv", "_ZN2ns1gEi", "_Z3foov", "_ZN2ns4frobEv"];
        let hint = rank("ns::f", image);
        assert_eq!(names(&hint.other_forms), ["_ZN2ns1fEv"]);
        assert_eq!(hint.other_forms[0].demangled.as_deref(), Some("ns::f()"));
        // Near paths among the demangled names.
        assert_eq!(names(&hint.near), ["_ZN2ns1gEi"]);
        // A plain name that is a C++ function: its mangled name.
        assert_eq!(names(&rank("foo", image).other_forms), ["_Z3foov"]);
        // Mangled with the wrong parameters: the right one.
        assert_eq!(names(&rank("_ZN2ns1fEi", image).other_forms), ["_ZN2ns1fEv"]);
    }

    #[test]
    fn rust_hashes_manglings_and_path_forms() {
        let legacy = "_ZN3app6Server6handle17h0123456789abcdefE";
        let v0 = "_RNvMNtCs1234_3app6serverNtB2_6Server6handle";
        assert_eq!(key(legacy).as_deref(), Some("app::Server::handle"));
        assert_eq!(key(v0).as_deref(), Some("app::server::Server::handle"));
        // A stale hash: the current one.
        let stale = "_ZN3app6Server6handle17hfedcba9876543210E";
        assert_eq!(names(&rank(stale, [legacy, "main"]).other_forms), [legacy]);
        // v0's path form against a legacy image, and the other way.
        assert_eq!(
            names(&rank("<app::Server>::handle", [legacy]).other_forms),
            [legacy]
        );
        assert_eq!(
            names(&rank("app::server::Server::handle", [v0]).other_forms),
            [v0],
            "{:?}",
            demangled(v0)
        );
        // A trait's method keeps its `<T as Trait>` form.
        assert_eq!(
            normal_path("<app::Server as core::fmt::Debug>::fmt"),
            "<app::Server as core::fmt::Debug>::fmt"
        );
        assert_eq!(normal_path("<app::Server>::handle"), "app::Server::handle");
        assert_eq!(normal_path("app::id::<u32>"), "app::id");
        // The legacy mangled name of a v0 image's function: the v0 name.
        let legacy_of_v0 = "_ZN3app6server6Server6handle17h0123456789abcdefE";
        assert_eq!(names(&rank(legacy_of_v0, [v0]).other_forms), [v0]);
    }

    /// This test binary's own names (legacy mangling, with hashes): a
    /// method named in v0's path form, and with a stale hash.
    #[test]
    fn rust_forms_in_a_real_binary() {
        let me = std::fs::read_link("/proc/self/exe").unwrap();
        let image = crate::image::Image::open(&me).unwrap();
        let symbols = crate::image::lookup::symbols(&image);
        let all = || symbols.iter().map(|s| s.name.as_str());
        let method = all()
            .find(|n| demangle(n).as_deref() == Some("hotpatch::image::image_file::ImageFile::symbol_names"))
            .expect("ImageFile::symbol_names in this binary");
        let hint = rank("<hotpatch::image::image_file::ImageFile>::symbol_names", all());
        assert_eq!(names(&hint.other_forms), [method]);
        let stale = format!("{}0000000000000000E", &method[..method.len() - 17]);
        assert_ne!(stale, method);
        assert_eq!(names(&rank(&stale, all()).other_forms), [method]);
    }

    #[test]
    fn file_qualified_queries_rank_their_name() {
        assert_eq!(
            names(&rank("server.c:countr", ["counter", "count", "x"]).near),
            ["count", "counter"]
        );
        // The name is there, but not in that file (or not a static).
        let hint = rank("other.c:counter", ["counter", "counters"]);
        assert_eq!(names(&hint.other_forms), ["counter"]);
        assert_eq!(names(&hint.near), ["counters"]);
    }

    #[test]
    fn message() {
        let hint = Hint {
            other_forms: vec![Suggested::of("_ZN2ns1fEv")],
            clones: vec!["f.constprop.0".into()],
            near: vec![Suggested::of("g")],
            inlined_into: Some((0..7).map(|i| format!("caller{i}")).collect()),
        };
        assert_eq!(
            hint.to_string(),
            "; debug info says it was inlined everywhere: patch its callers \
             (`caller0`, `caller1`, `caller2`, `caller3`, `caller4`, 2 more)\
             ; the same name in another form: `_ZN2ns1fEv` (ns::f())\
             ; only compiler clones of it (each a function of its own): `f.constprop.0`\
             ; near names: `g`"
        );
        assert_eq!(Hint::default().to_string(), "");
    }
}
