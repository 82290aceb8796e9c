//! `hotpatch check`: the patchability table of files and processes.

use anyhow::{Result, bail};
use hotpatch::patchability::{Class, ImageReport};
use hotpatch::process::Process;
use hotpatch::shorten::name;
use hotpatch::{Image, survey};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// An ELF executable or shared library.
    #[arg(required_unless_present = "pid", conflicts_with = "pid")]
    file: Option<PathBuf>,
    /// Check every image a running process maps, with its load address.
    #[arg(long)]
    pid: Option<i32>,
    /// List every function with its class.
    #[arg(long)]
    functions: bool,
    /// Print one JSON document instead of tables.
    #[arg(long)]
    json: bool,
}

/// A mapped file that is not an image we can check (data files, fonts…).
#[derive(Serialize)]
pub struct Skipped {
    pub path: String,
    pub error: String,
}

/// The whole answer, for people or as JSON.
#[derive(Serialize)]
pub struct CheckOutput {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process_name: Option<String>,
    pub images: Vec<ImageReport>,
    pub skipped: Vec<Skipped>,
}

pub fn run(args: Args) -> Result<()> {
    let mut output = match (&args.file, args.pid) {
        (Some(file), _) => CheckOutput {
            pid: None,
            process_name: None,
            images: vec![survey(&Image::open(file)?)],
            skipped: Vec::new(),
        },
        (None, Some(pid)) => check_process(pid)?,
        (None, None) => bail!("give a FILE or --pid PID"),
    };
    if !args.functions {
        for image in &mut output.images {
            image.functions.clear();
        }
    }
    let mut out = Vec::new();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &output)?;
        writeln!(out)?;
    } else {
        print_tables(&mut out, &output, args.functions)?;
    }
    crate::output::emit(&String::from_utf8_lossy(&out), || None)?;
    Ok(())
}

/// Survey every ELF image a process maps.
pub fn check_process(pid: i32) -> Result<CheckOutput> {
    let process = Process::open(pid)?;
    let name = process.name().ok();
    let mut images = Vec::new();
    let mut skipped = Vec::new();
    for mapped in process.mapped_images()? {
        let data = match hotpatch::image::file::read_image(&mapped.open_path) {
            Ok(d) => d,
            Err(e) => {
                skipped.push(Skipped {
                    path: mapped.path,
                    error: e.to_string(),
                });
                continue;
            }
        };
        match Image::parse(&mapped.path, data) {
            Ok(image) => {
                let mut report = survey(&image);
                report.load_bias = Some(mapped.base.wrapping_sub(image.link_base()));
                images.push(report);
            }
            Err(e) => skipped.push(Skipped {
                path: mapped.path,
                error: e.to_string(),
            }),
        }
    }
    Ok(CheckOutput {
        pid: Some(pid),
        process_name: name,
        images,
        skipped,
    })
}

fn percent(part: usize, whole: usize) -> String {
    if whole == 0 {
        "-".to_string()
    } else {
        format!("{:.1}%", 100.0 * part as f64 / whole as f64)
    }
}

pub fn print_tables(out: &mut impl Write, output: &CheckOutput, functions: bool) -> Result<()> {
    if let Some(pid) = output.pid {
        writeln!(
            out,
            "process {pid} ({}): {} images",
            output.process_name.as_deref().unwrap_or("?"),
            output.images.len()
        )?;
    }
    let name_width = output
        .images
        .iter()
        .map(|i| i.path.len())
        .max()
        .unwrap_or(5)
        .clamp(5, 60);
    writeln!(
        out,
        "{:<name_width$}  {:>14}  {:>9}  {:>9}  {:>8}  {:>9}  {:>10}  {:>7}  {:>8}  TOP REASONS",
        "IMAGE", "LOAD", "FUNCTIONS", "PATCHABLE", "PREPARED", "LIVE-SAFE", "DETOURABLE", "DIRECT", "NOT"
    )?;
    for image in &output.images {
        let s = &image.summary;
        let reasons: Vec<String> = s
            .reasons
            .iter()
            .take(3)
            .map(|r| format!("{} {}", r.label, r.count))
            .collect();
        writeln!(
            out,
            "{:<name_width$}  {:>14}  {:>9}  {:>9}  {:>8}  {:>9}  {:>10}  {:>7}  {:>8}  {}",
            name(&image.path),
            image
                .load_bias
                .map(|b| format!("{b:#x}"))
                .unwrap_or_else(|| "-".into()),
            s.functions,
            percent(s.prepared + s.detourable, s.functions),
            percent(s.prepared, s.functions),
            percent(s.prepared_live_safe, s.functions),
            percent(s.detourable, s.functions),
            percent(s.detourable_direct_calls, s.functions),
            percent(s.not_patchable, s.functions),
            reasons.join(", ")
        )?;
    }
    if !output.skipped.is_empty() {
        writeln!(
            out,
            "({} mapped files skipped: not x86-64 ELF images)",
            output.skipped.len()
        )?;
    }
    if functions {
        for image in &output.images {
            writeln!(out, "\n{}", name(&image.path))?;
            writeln!(
                out,
                "{:>18}  {:>6}  {:<15}  {:<32}  NAME",
                "ADDRESS", "SIZE", "CLASS", "HOW / WHY"
            )?;
            for f in &image.functions {
                let how = match &f.class {
                    Class::Prepared { layout, .. } => layout.clone(),
                    Class::Detourable {
                        detour, direct_calls, ..
                    } => {
                        let mut how = format!(
                            "jmp at +{}, moves {} bytes",
                            detour.patch_at - f.address,
                            detour.displaced
                        );
                        if *direct_calls > 0 {
                            how.push_str(&format!(", {direct_calls} direct calls"));
                        }
                        how
                    }
                    Class::NotPatchable { reason, .. } => reason.label().to_string(),
                };
                writeln!(
                    out,
                    "{:>#18x}  {:>6}  {:<15}  {:<32}  {}",
                    f.address,
                    f.size,
                    f.class.name(),
                    how,
                    name(&f.name)
                )?;
            }
        }
    }
    Ok(())
}
