//! The `hotpatch` command: a thin layer over the `hotpatch` library.

mod audit;
mod build;
mod check;
mod demo;
mod doctor;
mod files;
mod host;
mod output;
mod patching;
mod prepare;
mod signing;
mod status;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the request failed: bad input (file, pid, patch) or the target refused;
     the message names what and where, and nothing in a target was changed
  2  bad command line
  3  the command did its work (a patch WAS applied or reverted, a file
     written) but its output could not be written to stdout; stderr says
     what was done";

/// The longest error line printed whole, in bytes.
const MESSAGE_MAX: usize = 4096;

/// Hot-patch running Linux x86-64 processes: check what can be patched,
/// apply patch libraries to running processes, list and revert them.
#[derive(Parser)]
#[command(name = "hotpatch", version, about, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    trust: signing::TrustArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Report what in an ELF file or a running process can be hot-patched.
    #[command(after_help = EXIT_CODES)]
    Check(check::Args),
    /// Rewrite gcc's `90 90` entry nops into one 2-byte nop in a copy of a file.
    #[command(after_help = EXIT_CODES)]
    Prepare(prepare::Args),
    /// Load a patch library into a running process (or every process
    /// mapping its image, --all) and redirect its functions.
    #[command(after_help = EXIT_CODES, allow_missing_positional = true)]
    Apply(patching::ApplyArgs),
    /// List the patches applied to a process (as recorded inside it).
    #[command(after_help = EXIT_CODES)]
    List(patching::ListArgs),
    /// Every patched process on the host, with its patches.
    #[command(after_help = EXIT_CODES)]
    Status(status::Args),
    /// Revert a patch (or --all): functions go back to the previous version.
    #[command(after_help = EXIT_CODES)]
    Revert(patching::RevertArgs),
    /// Make a signing key pair: NAME.key (private) and NAME.pub.
    #[command(after_help = EXIT_CODES)]
    Keygen(signing::KeygenArgs),
    /// Sign a patch library (the signature goes inside the file).
    #[command(after_help = EXIT_CODES)]
    Sign(signing::SignArgs),
    /// Check a patch's signature against the trusted keys.
    #[command(after_help = EXIT_CODES)]
    Verify(signing::VerifyArgs),
    /// Check whether a process (or every process, --all) can be patched, and why not.
    ///
    /// The checks `apply` runs before touching a process. Exits 0 when they
    /// ran, whatever they found (`verdict` in --json).
    #[command(after_help = EXIT_CODES)]
    Doctor(doctor::Args),
    /// Build a patch library from a source fix: two builds, compared
    /// function by function, the changed code bound to the running binary.
    #[command(after_help = EXIT_CODES)]
    Build(build::Args),
    /// Build the bundled example server, start it, and show what hotpatch sees.
    #[command(after_help = EXIT_CODES)]
    Demo(demo::Args),
}

fn main() -> ExitCode {
    // Started as the builder's compiler wrapper (`cc`, `gcc`, … in its PATH)?
    if let Some(code) = hotpatch_build::wrapper::main_if_wrapping() {
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("HOTPATCH_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Build(args) => build::run(args),
        Command::Check(args) => check::run(args),
        Command::Prepare(args) => prepare::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Doctor(args) => doctor::run(args),
        Command::Apply(args) => patching::apply(args, &cli.trust),
        Command::List(args) => patching::list(args),
        Command::Status(args) => status::run(args),
        Command::Revert(args) => patching::revert(args, &cli.trust),
        Command::Keygen(args) => signing::keygen(args),
        Command::Sign(args) => signing::sign(args),
        Command::Verify(args) => signing::verify(args, &cli.trust),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<output::Unwritten>() {
            Some(unwritten) => {
                output::warn(&format!("hotpatch: {unwritten}"));
                ExitCode::from(output::EXIT_UNWRITTEN)
            }
            None => {
                // Names from a patch or a target can be any length; each
                // is cut where it is quoted, and the line as a whole here.
                let message = format!("hotpatch: {e:#}");
                output::warn(&hotpatch::shorten::shorten(&message, MESSAGE_MAX));
                ExitCode::from(1)
            }
        },
    }
}
