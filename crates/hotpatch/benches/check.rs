//! How long `hotpatch check` takes on real libraries: parse + survey, the
//! work `hotpatch check FILE` does. Prints figures; asserts nothing.
//!
//!     cargo bench -p hotpatch --bench check            # full
//!     cargo bench -p hotpatch --bench check -- --quick # CI smoke run

use std::time::{Duration, Instant};

const SUBJECTS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/libc.so.6",
    "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
    "/usr/bin/gdb",
];

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let runs = if quick { 2 } else { 15 };
    println!("| image | functions | median ms | min ms | functions/ms |");
    println!("|---|---:|---:|---:|---:|");
    for path in SUBJECTS {
        let Ok(data) = std::fs::read(path) else {
            println!("| {path} | (missing) | | | |");
            continue;
        };
        let mut times: Vec<Duration> = Vec::new();
        let mut functions = 0;
        for _ in 0..runs {
            let start = Instant::now();
            let image = match hotpatch::Image::parse(path, data.clone()) {
                Ok(i) => i,
                Err(e) => {
                    println!("| {path} | {e} | | | |");
                    break;
                }
            };
            let report = hotpatch::survey(&image);
            times.push(start.elapsed());
            functions = report.summary.functions;
            std::hint::black_box(report);
        }
        if times.is_empty() {
            continue;
        }
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let median = times[times.len() / 2];
        println!(
            "| {path} | {functions} | {:.2} | {:.2} | {:.0} |",
            ms(median),
            ms(times[0]),
            functions as f64 / ms(median)
        );
    }
}
