//! Key files (pure): one line of text each, versioned.
//!
//! ```text
//! hotpatch-ed25519-public v1 NAME BASE64
//! hotpatch-ed25519-private v1 NAME BASE64
//! ```
//!
//! `BASE64` (standard alphabet, padded) holds 32 bytes: the public key, or
//! the private key's seed. `NAME` is 1–64 characters of `A-Z a-z 0-9 . _
//! - @ +`, not starting with `.` or `-`; it names the signer in records,
//! `list` and the audit log. A trailing newline is allowed, nothing else.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{SigningKey, VerifyingKey};

const PUBLIC_TAG: &str = "hotpatch-ed25519-public";
const PRIVATE_TAG: &str = "hotpatch-ed25519-private";
const VERSION: &str = "v1";
/// The largest key file read (a valid one is under 150 bytes).
pub const MAX_KEY_FILE: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not a hotpatch key file: {0}")]
    Format(String),
    #[error("invalid key name `{0}`: use 1-64 of A-Z a-z 0-9 . _ - @ +, not starting with . or -")]
    Name(String),
}

/// A key's name, checked.
pub fn check_name(name: &str) -> Result<(), KeyError> {
    let ok = (1..=64).contains(&name.len())
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@' | '+'));
    if ok {
        Ok(())
    } else {
        Err(KeyError::Name(name.escape_debug().to_string()))
    }
}

/// A public key and the name it is trusted under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub name: String,
    pub key: VerifyingKey,
}

/// A private key and its name.
#[derive(Debug, Clone)]
pub struct PrivateKey {
    pub name: String,
    pub key: SigningKey,
}

impl PublicKey {
    pub fn parse(text: &str) -> Result<PublicKey, KeyError> {
        let (name, bytes) = parse_line(text, PUBLIC_TAG)?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| KeyError::Format("the public key is not a valid Ed25519 point".into()))?;
        Ok(PublicKey { name, key })
    }

    /// The file's text, newline-terminated.
    pub fn to_text(&self) -> String {
        format!(
            "{PUBLIC_TAG} {VERSION} {} {}\n",
            self.name,
            STANDARD.encode(self.key.as_bytes())
        )
    }
}

impl PrivateKey {
    /// A new key from 32 random bytes.
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Result<PrivateKey, KeyError> {
        check_name(name)?;
        Ok(PrivateKey {
            name: name.to_string(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// A new key from the kernel's random number generator.
    pub fn generate(name: &str) -> std::io::Result<PrivateKey> {
        let mut seed = [0u8; 32];
        let mut filled = 0;
        while filled < seed.len() {
            // SAFETY: the pointer and length describe the unfilled tail of
            // `seed`, which lives for the call.
            let n = unsafe { libc::getrandom(seed[filled..].as_mut_ptr().cast(), seed.len() - filled, 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            filled += n as usize;
        }
        let key = PrivateKey::from_seed(name, seed).map_err(std::io::Error::other);
        seed.fill(0);
        key
    }

    pub fn parse(text: &str) -> Result<PrivateKey, KeyError> {
        let (name, bytes) = parse_line(text, PRIVATE_TAG)?;
        Ok(PrivateKey {
            name,
            key: SigningKey::from_bytes(&bytes),
        })
    }

    pub fn to_text(&self) -> String {
        format!(
            "{PRIVATE_TAG} {VERSION} {} {}\n",
            self.name,
            STANDARD.encode(self.key.as_bytes())
        )
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }
}

fn parse_line(text: &str, tag: &str) -> Result<(String, [u8; 32]), KeyError> {
    let line = text.strip_suffix('\n').unwrap_or(text);
    let fields: Vec<&str> = line.split(' ').collect();
    let [t, version, name, data] = fields[..] else {
        return Err(KeyError::Format(format!(
            "expected one line `{tag} {VERSION} NAME BASE64`"
        )));
    };
    if t != tag {
        let other = if tag == PUBLIC_TAG {
            PRIVATE_TAG
        } else {
            PUBLIC_TAG
        };
        return Err(KeyError::Format(if t == other {
            format!("this is a {other} key, a {tag} key is needed here")
        } else {
            format!("expected `{tag}` first")
        }));
    }
    if version != VERSION {
        return Err(KeyError::Format(format!(
            "key format `{}` is not supported (this tool reads {VERSION})",
            version.escape_debug()
        )));
    }
    check_name(name)?;
    let bytes = STANDARD
        .decode(data)
        .map_err(|e| KeyError::Format(format!("bad base64: {e}")))?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|b: Vec<u8>| KeyError::Format(format!("{} key bytes, expected 32", b.len())))?;
    Ok((name.to_string(), bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let private = PrivateKey::from_seed("ops@build-1", [7; 32]).unwrap();
        let text = private.to_text();
        assert!(
            text.starts_with("hotpatch-ed25519-private v1 ops@build-1 "),
            "{text}"
        );
        let back = PrivateKey::parse(&text).unwrap();
        assert_eq!(back.key.to_bytes(), [7; 32]);
        assert_eq!(back.name, "ops@build-1");
        let public = private.public();
        assert_eq!(PublicKey::parse(&public.to_text()).unwrap(), public);
    }

    #[test]
    fn refuses_the_wrong_kind_and_bad_text() {
        let private = PrivateKey::from_seed("k", [7; 32]).unwrap();
        let e = PublicKey::parse(&private.to_text()).unwrap_err().to_string();
        assert!(e.contains("private key"), "{e}");
        for bad in [
            "",
            "hotpatch-ed25519-public v2 k AAAA",
            "hotpatch-ed25519-public v1 k AAAA",
            "hotpatch-ed25519-public v1 -k AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "hotpatch-ed25519-public v1 k  AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "hotpatch-ed25519-public v1 k AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n\n",
        ] {
            assert!(PublicKey::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn generated_keys_differ() {
        let a = PrivateKey::generate("a").unwrap();
        let b = PrivateKey::generate("a").unwrap();
        assert_ne!(a.key.to_bytes(), b.key.to_bytes());
        assert!(PrivateKey::generate("bad name").is_err());
    }

    #[test]
    fn names() {
        for good in ["a", "ops", "release-2025.1", "me@host", "x+y_z"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "-flag", "a b", "a/b", "a\nb", &"x".repeat(65), "é"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn parsing_never_panics(s in ".{0,200}") {
            let _ = PublicKey::parse(&s);
            let _ = PrivateKey::parse(&s);
        }
    }
}
