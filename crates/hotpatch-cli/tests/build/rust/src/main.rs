//! The Rust program of the `hotpatch build` tests: a counter in statics,
//! four threads adding to it, a function a fix changes.
use std::io::BufRead;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

static TOTAL: AtomicU64 = AtomicU64::new(0);
static HISTORY: Mutex<Vec<u64>> = Mutex::new(Vec::new());

#[inline(never)]
fn scale(x: u64) -> u64 {
    x * 2
}

#[inline(never)]
fn add(x: u64) -> u64 {
    let v = scale(x);
    let mut h = HISTORY.lock().unwrap();
    h.push(v);
    if h.len() > 100 {
        h.remove(0);
    }
    TOTAL.fetch_add(v, Ordering::SeqCst);
    v
}

fn main() {
    for _ in 0..4 {
        std::thread::spawn(|| {
            for i in 0u64.. {
                // Arguments the compiler cannot fold into `scale`.
                add(1 + i % 2);
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
        });
    }
    println!("ready");
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line.starts_with("step") {
            println!("step {}", add(1));
        } else if line.starts_with("total") {
            println!("total {}", TOTAL.load(Ordering::SeqCst));
        }
    }
}
