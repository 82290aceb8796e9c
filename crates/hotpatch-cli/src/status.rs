//! `hotpatch status`: every patched process on the host.

use crate::output;
use crate::patching::{function_lines, short};
use anyhow::Result;
use hotpatch::engine::{self, ProcessStatus};
use hotpatch::shorten::name;
use std::fmt::Write as _;

#[derive(clap::Args)]
pub struct Args {
    /// Also list processes that hold a record but no applied patch (every
    /// patch reverted: their code is original, the patch libraries stay
    /// loaded).
    #[arg(long)]
    all: bool,
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let mut found = engine::patched_processes()?;
    if !args.all {
        found
            .retain(|p| p.error.is_some() || p.listing.as_ref().is_some_and(|l| !l.state.patches.is_empty()));
    }
    let text = if args.json {
        format!("{}\n", serde_json::to_string_pretty(&found)?)
    } else {
        status_text(&found)?
    };
    output::emit(&text, || None)?;
    Ok(())
}

fn status_text(found: &[ProcessStatus]) -> Result<String> {
    let mut text = String::new();
    for p in found {
        let who = format!(
            "process {} ({}){}",
            p.process.pid,
            p.process.exe.as_deref().map(name).unwrap_or_else(|| "?".into()),
            p.process.container_note()
        );
        let Some(listing) = &p.listing else {
            writeln!(
                text,
                "{who}: its record cannot be read: {}",
                p.error.as_deref().unwrap_or("?")
            )?;
            continue;
        };
        let state = &listing.state;
        writeln!(text, "{who}: {} patch(es)", state.patches.len())?;
        for patch in &state.patches {
            writeln!(
                text,
                "  patch {}: {} on {} (build-id {}), sha256 {}, {}, applied {}{}",
                patch.id,
                name(&patch.path),
                name(&patch.image),
                patch.image_build_id.as_deref().map(short).unwrap_or("none"),
                patch.sha256.as_deref().map(short).unwrap_or("unknown"),
                patch
                    .signer
                    .as_deref()
                    .map(|s| format!("signed by {}", name(s)))
                    .unwrap_or_else(|| "unsigned".into()),
                utc(patch.applied_at),
                if patch.complete {
                    ""
                } else {
                    "  (INCOMPLETE: revert it)"
                }
            )?;
            function_lines(&mut text, listing, patch)?;
        }
    }
    writeln!(text, "{} patched process(es)", found.len())?;
    Ok(text)
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS UTC`.
fn utc(seconds: u64) -> String {
    let days = (seconds / 86_400) as i64;
    let rest = seconds % 86_400;
    // Days to a civil date (proleptic Gregorian), after H. Hinnant.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3_600,
        rest % 3_600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::utc;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_796_325_045), "2026-12-03 19:10:45 UTC");
    }
}
