//! `hotpatch demo`: build the bundled example server, start it, and show
//! what `hotpatch check --pid` sees in it. (Live patching extends this.)

use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

const SERVER_C: &str = include_str!("../../../examples/server/server.c");

#[derive(clap::Args)]
pub struct Args {
    /// C compiler to build the example with.
    #[arg(long, default_value = "cc")]
    cc: String,
}

/// Kills the server however the demo ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn build_server(cc: &str, dir: &Path) -> Result<std::path::PathBuf> {
    let src = dir.join("server.c");
    let bin = dir.join("fee-server");
    std::fs::write(&src, SERVER_C)?;
    let status = Command::new(cc)
        .args(["-O2", "-g", "-pthread", "-fpatchable-function-entry=8,6", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .with_context(|| format!("cannot run the C compiler `{cc}`"))?;
    if !status.success() {
        bail!("`{cc}` failed to build the example server ({status})");
    }
    Ok(bin)
}

pub fn run(args: Args) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("hotpatch-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run_in(&args, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(args: &Args, dir: &Path) -> Result<()> {
    println!("== building the example server (gcc -fpatchable-function-entry=8,6)");
    let bin = build_server(&args.cc, dir)?;
    let mut child = Command::new(&bin)
        .args(["0", "4"])
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start the example server")?;
    let stdout = child.stdout.take().context("no stdout from the server")?;
    let server = Server(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let port = line
        .trim()
        .strip_prefix("listening on ")
        .context("the server did not start")?;
    println!(
        "== fee-server pid {} listening on 127.0.0.1:{port}",
        server.0.id()
    );
    let pid = i32::try_from(server.0.id())?;
    let output = crate::check::check_process(pid)?;
    println!("== hotpatch check --pid {pid}");
    crate::check::print_tables(&mut std::io::stdout().lock(), &output, false)?;
    let main = output.images.first().and_then(|i| {
        i.functions
            .iter()
            .find(|f| f.name == "compute_fee")
            .map(|f| (i, f))
    });
    // check_process keeps the function list: show the function the fix targets.
    if let Some((image, f)) = main {
        println!(
            "== {}: compute_fee at {:#x} (+{:#x} load bias) is {}",
            image.path,
            f.address,
            image.load_bias.unwrap_or(0),
            f.class.name()
        );
    }
    drop(server);
    println!("== server stopped");
    Ok(())
}
