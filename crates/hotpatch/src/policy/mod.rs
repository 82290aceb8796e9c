//! Which patches may be applied: signatures, trusted keys, the policy file.
//!
//! [`Policy::approve`] is the only way to obtain an [`Approved`] patch: the
//! bytes read once from the patch file (never its path again), with the
//! signer the check found. The command line hands those bytes to
//! [`crate::engine::apply_file`].
//!
//! The rules:
//! - A patch with a signature section is always verified: a signature that
//!   does not match the file's bytes is refused, with or without a policy.
//! - Without a policy file (or with `require_signature = false`), unsigned
//!   patches are allowed; a signed one is recorded with its signer (the
//!   trusted key's name, or `untrusted key FINGERPRINT`).
//! - With `require_signature = true`, the patch must carry a valid
//!   signature by a key in the trusted keys directory.
//! - A patch file, the policy file, the keys directory or a key file that
//!   anyone but root (or the running user) can write is refused; policy
//!   and key files must not be symbolic links (see [`trusted_file`]).
//!
//! [`signature`], [`key`] and [`rules`] are pure; [`trusted_file`] is the
//! edge that opens files.

pub mod exclude;
pub mod key;
pub mod rules;
pub mod signature;
pub mod trusted_file;

use crate::image::ImageError;
use crate::patchfile::PatchFile;
use ed25519_dalek::VerifyingKey;
use key::{KeyError, PublicKey};
use rules::Rules;
use signature::{SignatureError, Signed};
use std::path::{Path, PathBuf};

/// The policy file read when none is given.
pub const DEFAULT_POLICY: &str = "/etc/hotpatch/policy.toml";

/// Why a patch (or the policy itself) was refused. Every variant names the
/// file.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{what} {}: {error}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("refusing the {what} {}: {why}", path.display())]
    Insecure {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("policy file {}: {error}", path.display())]
    Rules { path: PathBuf, error: String },
    #[error("key file {}: {error}", path.display())]
    Key { path: PathBuf, error: KeyError },
    #[error("keys directory {}: {what}", dir.display())]
    Keyring { dir: PathBuf, what: String },
    #[error("{}: refused: bad signature: {error}", path.display())]
    BadSignature { path: PathBuf, error: SignatureError },
    #[error("{}: refused: not signed, and {policy} requires a signature by a trusted key", path.display())]
    Unsigned { path: PathBuf, policy: String },
    #[error(
        "{}: refused: signed by key {fingerprint}, which is not trusted (no key in {} matches), and {policy} requires a signature by a trusted key",
        path.display(), keys_dir.display()
    )]
    Untrusted {
        path: PathBuf,
        fingerprint: String,
        keys_dir: PathBuf,
        policy: String,
    },
}

impl PolicyError {
    /// The policy refused (a signature, a trust or a permission problem),
    /// as opposed to a file that could not be read.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            PolicyError::Insecure { .. }
                | PolicyError::BadSignature { .. }
                | PolicyError::Unsigned { .. }
                | PolicyError::Untrusted { .. }
        )
    }

    /// The file or directory is not there.
    pub fn is_not_found(&self) -> bool {
        matches!(self, PolicyError::Io { error, .. } if error.kind() == std::io::ErrorKind::NotFound)
    }
}

/// A patch the policy allows: its bytes and who signed it.
#[derive(Debug, Clone)]
pub struct Approved {
    file: PatchFile,
    signer: Option<String>,
}

impl Approved {
    pub fn file(&self) -> &PatchFile {
        &self.file
    }

    /// The trusted key's name, `untrusted key FINGERPRINT` (allowed only
    /// without `require_signature`), or `None`: unsigned.
    pub fn signer(&self) -> Option<&str> {
        self.signer.as_deref()
    }
}

/// The trusted public keys.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    keys: Vec<PublicKey>,
}

impl Keyring {
    /// The keys of `files` (`(path, text)`), refusing two keys under one
    /// name or one key under two names (the signer's name would be
    /// ambiguous).
    pub fn parse(files: &[(PathBuf, String)]) -> Result<Keyring, PolicyError> {
        let mut keys: Vec<PublicKey> = Vec::new();
        for (path, text) in files {
            let key = PublicKey::parse(text).map_err(|error| PolicyError::Key {
                path: path.clone(),
                error,
            })?;
            if let Some(other) = keys.iter().find(|k| k.name == key.name || k.key == key.key) {
                return Err(PolicyError::Key {
                    path: path.clone(),
                    error: KeyError::Format(if other.name == key.name {
                        format!("a second key named `{}`", key.name)
                    } else {
                        format!("the same key as `{}`, under another name", other.name)
                    }),
                });
            }
            keys.push(key);
        }
        Ok(Keyring { keys })
    }

    pub fn find(&self, key: &VerifyingKey) -> Option<&PublicKey> {
        self.keys.iter().find(|k| &k.key == key)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// What the signature check found, before any rule is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Unsigned,
    /// A valid signature by a trusted key of this name.
    Trusted {
        name: String,
        fingerprint: String,
    },
    /// A valid signature by a key that is not trusted.
    Untrusted {
        fingerprint: String,
    },
}

impl Verdict {
    /// How a record names the signer.
    pub fn signer(&self) -> Option<String> {
        match self {
            Verdict::Unsigned => None,
            Verdict::Trusted { name, .. } => Some(name.clone()),
            Verdict::Untrusted { fingerprint } => Some(format!("untrusted key {fingerprint}")),
        }
    }
}

/// The signature of `file` checked against `keys` (pure).
pub fn verdict(file: &PatchFile, keys: &Keyring) -> Result<Verdict, PolicyError> {
    Ok(verdict_of(verify(file)?, keys))
}

fn verify(file: &PatchFile) -> Result<Option<Signed>, PolicyError> {
    signature::verify(file.bytes()).map_err(|error| PolicyError::BadSignature {
        path: file.path().to_path_buf(),
        error,
    })
}

fn verdict_of(signed: Option<Signed>, keys: &Keyring) -> Verdict {
    match signed {
        None => Verdict::Unsigned,
        Some(Signed { key }) => {
            let fingerprint = signature::fingerprint(&key);
            match keys.find(&key) {
                Some(k) => Verdict::Trusted {
                    name: k.name.clone(),
                    fingerprint,
                },
                None => Verdict::Untrusted { fingerprint },
            }
        }
    }
}

/// The policy in force: the rules, where they came from, where the keys are.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Rules,
    /// The policy file; `None`: there is none (the defaults apply).
    source: Option<PathBuf>,
    keys_dir: PathBuf,
}

impl Policy {
    /// The policy of `policy` (or of [`DEFAULT_POLICY`] if it exists), with
    /// the keys directory `keys` if given (else the file's `keys_dir`, else
    /// [`rules::DEFAULT_KEYS_DIR`]). A policy file given explicitly must
    /// exist.
    pub fn load(policy: Option<&Path>, keys: Option<&Path>) -> Result<Policy, PolicyError> {
        Policy::load_or(policy, keys, Path::new(DEFAULT_POLICY))
    }

    /// [`Policy::load`] with `default` for [`DEFAULT_POLICY`].
    fn load_or(policy: Option<&Path>, keys: Option<&Path>, default: &Path) -> Result<Policy, PolicyError> {
        let (path, explicit) = match policy {
            Some(p) => (p.to_path_buf(), true),
            None => (default.to_path_buf(), false),
        };
        let (rules, source) = match trusted_file::read_policy(&path) {
            Ok(text) => (
                Rules::parse(&text).map_err(|error| PolicyError::Rules {
                    path: path.clone(),
                    error,
                })?,
                Some(path),
            ),
            Err(e) if e.is_not_found() && !explicit => (Rules::default(), None),
            Err(e) => return Err(e),
        };
        Ok(Policy::new(rules, source, keys))
    }

    /// A policy from rules already read (`source` names their file).
    pub fn new(rules: Rules, source: Option<PathBuf>, keys: Option<&Path>) -> Policy {
        let keys_dir = keys
            .map(Path::to_path_buf)
            .or_else(|| rules.keys_dir.clone())
            .unwrap_or_else(|| PathBuf::from(rules::DEFAULT_KEYS_DIR));
        Policy {
            rules,
            source,
            keys_dir,
        }
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    pub fn keys_dir(&self) -> &Path {
        &self.keys_dir
    }

    /// Where audit records go.
    pub fn audit_socket(&self) -> &Path {
        self.rules
            .audit_socket
            .as_deref()
            .unwrap_or(Path::new(rules::DEFAULT_AUDIT_SOCKET))
    }

    /// "the policy FILE" or "no policy file", for messages.
    pub fn describe(&self) -> String {
        match &self.source {
            Some(p) => format!("the policy {}", p.display()),
            None => "no policy file".to_string(),
        }
    }

    /// The policy's exclusions, user and group names resolved on this host
    /// (a name that does not resolve is an error naming the policy file).
    pub fn exclusions(&self) -> Result<exclude::Exclusions, PolicyError> {
        let user = |n: &str| {
            nix::unistd::User::from_name(n)
                .ok()
                .flatten()
                .map(|u| u.uid.as_raw())
        };
        let group = |n: &str| {
            nix::unistd::Group::from_name(n)
                .ok()
                .flatten()
                .map(|g| g.gid.as_raw())
        };
        self.rules
            .exclude
            .resolve(user, group)
            .map_err(|error| PolicyError::Rules {
                path: self
                    .source
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_POLICY)),
                error,
            })
    }

    /// The trusted keys. A missing directory is an empty keyring.
    pub fn keyring(&self) -> Result<Keyring, PolicyError> {
        match trusted_file::read_keys_dir(&self.keys_dir) {
            Ok(files) => Keyring::parse(&files),
            Err(e) if e.is_not_found() => Ok(Keyring::default()),
            Err(e) => Err(e),
        }
    }

    /// Read the patch at `path` (once; see [`trusted_file::read_patch`])
    /// and [`approve`](Policy::approve) it.
    pub fn read_and_approve(&self, path: &Path) -> Result<Approved, PolicyError> {
        self.approve(trusted_file::read_patch(path)?)
    }

    /// Check `file` against the policy. The keys directory is read only
    /// when needed: the patch is signed, or the policy requires a
    /// signature.
    pub fn approve(&self, file: PatchFile) -> Result<Approved, PolicyError> {
        let signed = verify(&file)?;
        let keys = if signed.is_some() || self.rules.require_signature {
            self.keyring()?
        } else {
            Keyring::default()
        };
        let verdict = verdict_of(signed, &keys);
        self.decide(&file, &verdict)?;
        Ok(Approved {
            signer: verdict.signer(),
            file,
        })
    }

    /// The rules applied to a verdict (pure).
    fn decide(&self, file: &PatchFile, verdict: &Verdict) -> Result<(), PolicyError> {
        if !self.rules.require_signature {
            return Ok(());
        }
        match verdict {
            Verdict::Trusted { .. } => Ok(()),
            Verdict::Unsigned => Err(PolicyError::Unsigned {
                path: file.path().to_path_buf(),
                policy: self.describe(),
            }),
            Verdict::Untrusted { fingerprint } => Err(PolicyError::Untrusted {
                path: file.path().to_path_buf(),
                fingerprint: fingerprint.clone(),
                keys_dir: self.keys_dir.clone(),
                policy: self.describe(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use key::PrivateKey;

    fn patch(bytes: Vec<u8>) -> PatchFile {
        PatchFile::from_bytes(Path::new("/x/p.so"), bytes)
    }

    fn policy(require: bool) -> Policy {
        Policy::new(
            Rules {
                require_signature: require,
                ..Rules::default()
            },
            Some(PathBuf::from("/etc/p.toml")),
            Some(Path::new("/nonexistent-keys")),
        )
    }

    fn trusted(seed: u8, name: &str) -> Keyring {
        let k = PrivateKey::from_seed(name, [seed; 32]).unwrap();
        Keyring::parse(&[(PathBuf::from("k.pub"), k.public().to_text())]).unwrap()
    }

    #[test]
    fn the_four_cases_with_and_without_the_policy() {
        let unsigned = signature::tests::tiny_elf();
        let signed = signature::sign(&unsigned, &SigningKey::from_bytes(&[1; 32])).unwrap();
        let mut tampered = signed.clone();
        tampered[66] ^= 1;
        let keys = trusted(1, "release");
        let none = Keyring::default();

        // Verdicts.
        assert_eq!(
            verdict(&patch(unsigned.clone()), &keys).unwrap(),
            Verdict::Unsigned
        );
        let v = verdict(&patch(signed.clone()), &keys).unwrap();
        assert!(
            matches!(&v, Verdict::Trusted { name, .. } if name == "release"),
            "{v:?}"
        );
        assert_eq!(v.signer().as_deref(), Some("release"));
        let v = verdict(&patch(signed.clone()), &none).unwrap();
        assert!(matches!(v, Verdict::Untrusted { .. }), "{v:?}");
        assert!(v.signer().unwrap().starts_with("untrusted key "));
        let e = verdict(&patch(tampered.clone()), &keys).unwrap_err().to_string();
        assert!(
            e.contains("bad signature") && e.contains("changed after signing"),
            "{e}"
        );

        // Rules.
        let off = policy(false);
        let on = policy(true);
        for v in [
            Verdict::Unsigned,
            Verdict::Untrusted {
                fingerprint: "ab".into(),
            },
        ] {
            assert!(off.decide(&patch(vec![]), &v).is_ok());
            let e = on.decide(&patch(vec![]), &v).unwrap_err().to_string();
            assert!(e.contains("refused") && e.contains("/etc/p.toml"), "{e}");
        }
        let t = Verdict::Trusted {
            name: "n".into(),
            fingerprint: "ab".into(),
        };
        assert!(on.decide(&patch(vec![]), &t).is_ok());

        // approve() end to end, with no keys directory.
        assert_eq!(off.approve(patch(unsigned.clone())).unwrap().signer(), None);
        assert!(
            off.approve(patch(signed.clone()))
                .unwrap()
                .signer()
                .unwrap()
                .starts_with("untrusted key")
        );
        assert!(
            off.approve(patch(tampered.clone())).is_err(),
            "a bad signature is always refused"
        );
        assert!(matches!(
            on.approve(patch(unsigned)),
            Err(PolicyError::Unsigned { .. })
        ));
        assert!(matches!(
            on.approve(patch(signed)),
            Err(PolicyError::Untrusted { .. })
        ));
        assert!(matches!(
            on.approve(patch(tampered)),
            Err(PolicyError::BadSignature { .. })
        ));
    }

    #[test]
    fn keyring_refuses_ambiguous_names() {
        let a = PrivateKey::from_seed("a", [1; 32]).unwrap().public();
        let a2 = PrivateKey::from_seed("a", [2; 32]).unwrap().public();
        let b = PrivateKey::from_seed("b", [1; 32]).unwrap().public();
        let files = |ks: &[&PublicKey]| {
            ks.iter()
                .map(|k| (PathBuf::from(format!("{}.pub", k.name)), k.to_text()))
                .collect::<Vec<_>>()
        };
        assert!(Keyring::parse(&files(&[&a, &a2])).is_err());
        assert!(Keyring::parse(&files(&[&a, &b])).is_err());
        assert_eq!(Keyring::parse(&files(&[&a2, &b])).unwrap().len(), 2);
    }

    #[test]
    fn explicit_policy_must_exist_default_may_not() {
        let dir = tempfile::tempdir().unwrap();
        let absent = dir.path().join("none.toml");
        assert!(
            Policy::load_or(Some(&absent), None, Path::new("/nonexistent"))
                .unwrap_err()
                .is_not_found()
        );
        // No default file: no policy, unsigned patches allowed.
        let p = Policy::load_or(None, None, &absent).unwrap();
        assert_eq!(p.describe(), "no policy file");
        assert!(!p.rules().require_signature);
        assert_eq!(p.keys_dir(), Path::new(rules::DEFAULT_KEYS_DIR));
        assert_eq!(p.audit_socket(), Path::new(rules::DEFAULT_AUDIT_SOCKET));
        // A default file is read, and --keys wins over its keys_dir.
        let file = dir.path().join("policy.toml");
        std::fs::write(&file, "require_signature = true\nkeys_dir = \"/k\"\n").unwrap();
        let p = Policy::load_or(None, None, &file).unwrap();
        assert!(p.rules().require_signature);
        assert_eq!(p.keys_dir(), Path::new("/k"));
        assert_eq!(
            Policy::load_or(None, Some(Path::new("/o")), &file)
                .unwrap()
                .keys_dir(),
            Path::new("/o")
        );
        // A symlinked or broken default file is refused, not skipped.
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(Policy::load_or(None, None, &link).unwrap_err().is_refusal());
        std::fs::write(&file, "require_signature = maybe\n").unwrap();
        let e = Policy::load_or(None, None, &file).unwrap_err().to_string();
        assert!(e.contains("policy file") && e.contains("policy.toml"), "{e}");
    }
}
