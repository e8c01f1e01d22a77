//! Times detection per name over the bench's model ids, for quick checks
//! outside criterion: `cargo run --release --example detect_timing [ROUNDS]`.
//! (`cargo bench --bench detect` is the reference figure.)
use std::hint::black_box;
use std::time::Instant;

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|r| r.parse().ok())
        .unwrap_or(2000);
    let ids: Vec<&str> = include_str!("../benches/data/model_ids.txt")
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let t = Instant::now();
    for _ in 0..rounds {
        for id in &ids {
            black_box(qlora_scale::detect_model_size(black_box(*id)));
        }
    }
    let ns = t.elapsed().as_nanos() as f64 / (rounds * ids.len()) as f64;
    println!("{ns:.1} ns/name (wall) over {} ids x {rounds}", ids.len());
}
