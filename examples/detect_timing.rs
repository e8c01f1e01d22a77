//! Times detection per name over the bench's model ids (a quick check; the
//! criterion bench `cargo bench --bench detect` is the reference figure).
use std::hint::black_box;
use std::time::Instant;

fn main() {
    let ids: Vec<&str> = include_str!("../benches/data/model_ids.txt")
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for _ in 0..3 {
        let t = Instant::now();
        let rounds = 2000;
        for _ in 0..rounds {
            for id in &ids {
                black_box(qlora_scale::detect_model_size(black_box(*id)));
            }
        }
        let ns = t.elapsed().as_nanos() as f64 / (rounds * ids.len()) as f64;
        println!("{ns:.1} ns/name over {} ids", ids.len());
    }
}
