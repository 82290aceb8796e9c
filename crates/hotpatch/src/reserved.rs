//! The functions of a target that hotpatch itself runs, and which a patch
//! therefore may not replace (pure).
//!
//! Every apply loads the patch with `dlopen`, finds its functions with
//! `dlsym`, explains a failed load with `dlerror`, unloads a patch that
//! cannot be applied with `dlclose`, and saves and restores the
//! interrupted code's `errno` through `__errno_location` — all called
//! inside the target, on a borrowed thread (`process::remote`). A patch
//! that replaced one of them would put its own code under the tool's
//! machinery: the next apply would run it with the tool's arguments and
//! trust what it returns (an address to jump to, a pointer the stub
//! writes through). `dlopen` itself runs the dynamic loader's code
//! (`ld-linux-x86-64.so.2`: mapping, relocation, the debugger hook), so
//! no function of the loader may be replaced either.

use crate::image::SymbolKind;
use crate::plan::Planner;

/// A function of the C library the tool calls in the target, and what for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Called {
    pub name: &'static str,
    pub why: &'static str,
}

/// Every C library function the tool calls in a target.
pub const CALLED: [Called; 5] = [
    Called {
        name: "dlopen",
        why: "hotpatch calls `dlopen` inside the target to load patches",
    },
    Called {
        name: "dlsym",
        why: "hotpatch calls `dlsym` inside the target to find a patch's functions and jumps to what it returns",
    },
    Called {
        name: "dlerror",
        why: "hotpatch calls `dlerror` inside the target to say why a patch did not load",
    },
    Called {
        name: "dlclose",
        why: "hotpatch calls `dlclose` inside the target to unload a patch it could not apply",
    },
    Called {
        name: "__errno_location",
        why: "hotpatch calls `__errno_location` around every call it makes inside the target, and writes through the pointer it returns",
    },
];

/// Whether `path` names a C library the tool calls into (glibc
/// `libc.so.6`, or musl's `ld-musl-*.so.1`, which is also its loader).
pub fn is_c_library(path: &str) -> bool {
    let name = file_name(path);
    name.starts_with("libc.so") || name.starts_with("libc-2.") || name.starts_with("ld-musl-")
}

/// Whether `path` names glibc's dynamic loader, whose code `dlopen` runs.
pub fn is_dynamic_loader(path: &str) -> bool {
    let name = file_name(path);
    name.starts_with("ld-linux") || name == "ld.so" || name.starts_with("ld-2.")
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// One function a patch names that the tool runs itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The name the patch used.
    pub name: String,
    pub why: String,
}

/// The functions among `planned` (name as the patch gave it, entry as a
/// file address of `planner`'s image) that the tool runs itself. Aliases
/// count: a function is matched by its address, not its name.
pub fn refusals(planner: &Planner<'_>, planned: &[(String, u64)]) -> Vec<Refusal> {
    let path = planner.path().display().to_string();
    if is_dynamic_loader(&path) {
        let why = format!(
            "hotpatch loads patches with `dlopen`, which runs the code of the dynamic loader ({})",
            file_name(&path)
        );
        return planned
            .iter()
            .map(|(name, _)| Refusal {
                name: name.clone(),
                why: why.clone(),
            })
            .collect();
    }
    if !is_c_library(&path) {
        return Vec::new();
    }
    let called: Vec<(u64, &Called)> = CALLED
        .iter()
        .filter_map(|c| {
            let sym = planner.symbol(c.name).ok()?;
            (sym.kind == SymbolKind::Function).then_some((sym.address, c))
        })
        .collect();
    planned
        .iter()
        .filter_map(|(name, entry)| {
            let (_, c) = called.iter().find(|(a, _)| a == entry)?;
            let why = if name == c.name {
                c.why.to_string()
            } else {
                format!("`{}` is `{}`: {}", crate::shorten::name(name), c.name, c.why)
            };
            Some(Refusal {
                name: name.clone(),
                why,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Image;

    const LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";
    const LOADER: &str = "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2";

    fn entry(planner: &Planner<'_>, name: &str) -> u64 {
        planner.symbol(name).expect(name).address
    }

    #[test]
    fn names() {
        assert!(is_c_library(LIBC) && is_c_library("/lib/ld-musl-x86_64.so.1"));
        assert!(!is_c_library("/usr/lib/libcurl.so.4") && !is_c_library("/srv/libc_tools.so"));
        assert!(is_dynamic_loader(LOADER) && is_dynamic_loader("/lib64/ld-linux-x86-64.so.2"));
        assert!(!is_dynamic_loader(LIBC) && !is_dynamic_loader("/usr/lib/ldap.so"));
    }

    #[test]
    fn libc_functions_the_tool_calls_are_refused_by_address() {
        let Ok(image) = Image::open(LIBC) else {
            eprintln!("{LIBC} not readable: skipped");
            return;
        };
        let planner = Planner::new(&image);
        let mut planned: Vec<(String, u64)> = CALLED
            .iter()
            .map(|c| (c.name.to_string(), entry(&planner, c.name)))
            .collect();
        planned.push(("abs".into(), entry(&planner, "abs")));
        planned.push(("malloc".into(), entry(&planner, "malloc")));
        let refused = refusals(&planner, &planned);
        let names: Vec<&str> = refused.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["dlopen", "dlsym", "dlerror", "dlclose", "__errno_location"]
        );
        assert!(refused[0].why.contains("load patches"), "{:?}", refused[0]);
        // An alias at the same address is the same function.
        let alias = ("my_name_for_dlsym".to_string(), entry(&planner, "dlsym"));
        let refused = refusals(&planner, &[alias]);
        assert_eq!(refused.len(), 1);
        assert!(
            refused[0].why.starts_with("`my_name_for_dlsym` is `dlsym`"),
            "{:?}",
            refused[0]
        );
    }

    #[test]
    fn every_function_of_the_loader_is_refused() {
        let Ok(image) = Image::open(LOADER) else {
            eprintln!("{LOADER} not readable: skipped");
            return;
        };
        let planner = Planner::new(&image);
        let f = image.functions().first().expect("the loader has functions");
        let refused = refusals(&planner, &[("anything".into(), f.address)]);
        assert_eq!(refused.len(), 1);
        assert!(refused[0].why.contains("dynamic loader"), "{:?}", refused[0]);
    }

    #[test]
    fn other_images_are_not_concerned() {
        let Ok(image) = Image::open("/proc/self/exe") else {
            return;
        };
        let planner = Planner::new(&image);
        let f = image.functions().first().expect("functions");
        assert!(refusals(&planner, &[("x".into(), f.address)]).is_empty());
    }
}
