//! `hotpatch keygen`, `sign` and `verify`, and the `--policy`/`--keys`
//! options every command that checks patches takes.

use anyhow::{Context, Result, bail};
use hotpatch::policy::key::{PrivateKey, check_name};
use hotpatch::policy::{self, Policy, Verdict, signature, trusted_file};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Where the policy and the trusted keys are (global options).
#[derive(clap::Args, Clone, Default)]
pub struct TrustArgs {
    /// The policy file [default: /etc/hotpatch/policy.toml, if it exists].
    #[arg(long, global = true, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// The directory of trusted public keys (*.pub) [default: the
    /// policy's keys_dir, else /etc/hotpatch/keys].
    #[arg(long, global = true, value_name = "DIR")]
    pub keys: Option<PathBuf>,
}

impl TrustArgs {
    pub fn load(&self) -> Result<Policy, policy::PolicyError> {
        Policy::load(self.policy.as_deref(), self.keys.as_deref())
    }
}

#[derive(clap::Args)]
pub struct KeygenArgs {
    /// The key's name (A-Z a-z 0-9 . _ - @ +): it names the signer in
    /// `list` and the audit log.
    name: String,
    /// Where to write NAME.key (private, mode 0600) and NAME.pub.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
}

#[derive(clap::Args)]
pub struct SignArgs {
    /// The patch library to sign.
    patch: PathBuf,
    /// The private key file (from `hotpatch keygen`).
    #[arg(long, value_name = "PRIVATE")]
    key: PathBuf,
    /// Write the signed patch here [default: replace PATCH, by renaming a
    /// new file over it].
    #[arg(short, long, value_name = "OUT")]
    output: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The patch library to check.
    patch: PathBuf,
}

pub fn keygen(args: KeygenArgs) -> Result<()> {
    check_name(&args.name)?;
    let key = PrivateKey::generate(&args.name).context("cannot get random bytes for a key")?;
    let private = args.dir.join(format!("{}.key", args.name));
    let public = args.dir.join(format!("{}.pub", args.name));
    create_new(&private, 0o600, &key.to_text())?;
    if let Err(e) = create_new(&public, 0o644, &key.public().to_text()) {
        // Leave nothing half made.
        let _ = std::fs::remove_file(&private);
        return Err(e);
    }
    let text = format!(
        "private key: {} (keep it secret)\n\
         public key:  {} (install it in /etc/hotpatch/keys/ where patches are applied)\n\
         fingerprint: {}\n",
        private.display(),
        public.display(),
        signature::fingerprint(&key.public().key)
    );
    crate::output::emit(&text, || {
        Some(format!(
            "{} and {} WERE written",
            private.display(),
            public.display()
        ))
    })?;
    Ok(())
}

/// Create `path` (never an existing file or a link) with `mode` and `text`.
fn create_new(path: &Path, mode: u32, text: &str) -> Result<()> {
    let mut file = std::fs::File::options()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    // The umask may have taken bits away; it never adds any.
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .and_then(|()| file.write_all(text.as_bytes()))
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

pub fn sign(args: SignArgs) -> Result<()> {
    let text = trusted_file::read_private_key(&args.key)?;
    let key = PrivateKey::parse(&text).with_context(|| format!("key file {}", args.key.display()))?;
    let (file, meta) = hotpatch::image::file::open_regular(&args.patch)?;
    let bytes = hotpatch::image::file::read_open(&args.patch, file, &meta)?;
    let signed =
        signature::sign(&bytes, &key.key).with_context(|| format!("cannot sign {}", args.patch.display()))?;
    let out = args.output.as_deref().unwrap_or(&args.patch);
    // Never group- or world-writable: apply would refuse it.
    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o755;
    crate::files::replace_file(out, &signed, mode)?;
    let text = format!(
        "{}: signed by {} (key {})\n",
        out.display(),
        key.name,
        signature::fingerprint(&key.key.verifying_key())
    );
    crate::output::emit(&text, || Some(format!("{} WAS signed", out.display())))?;
    Ok(())
}

pub fn verify(args: VerifyArgs, trust: &TrustArgs) -> Result<()> {
    let policy = trust.load()?;
    let file = trusted_file::read_patch(&args.patch)?;
    let keys = policy.keyring()?;
    match policy::verdict(&file, &keys)? {
        Verdict::Trusted { name, fingerprint } => {
            let text = format!(
                "{}: signed by {name} (key {fingerprint}), trusted in {}\n",
                args.patch.display(),
                policy.keys_dir().display()
            );
            crate::output::emit(&text, || None)?;
            Ok(())
        }
        Verdict::Untrusted { fingerprint } => bail!(
            "{}: valid signature by key {fingerprint}, which is not trusted ({})",
            args.patch.display(),
            if keys.is_empty() {
                format!("no trusted keys in {}", policy.keys_dir().display())
            } else {
                format!("no key in {} matches", policy.keys_dir().display())
            }
        ),
        Verdict::Unsigned => bail!("{}: not signed", args.patch.display()),
    }
}
