//! Peak memory and step time of one QLoRA benchmark configuration, in a
//! process of its own: `qlora_peak CONFIG [STEPS]` with CONFIG one of the
//! names in `benches/qlora_support/mod.rs` (`nf4+ckpt`, ...). Prints one
//! tab-separated line: config, frozen MiB, peak RSS after building (MiB),
//! peak RSS after the steps (MiB), mean step seconds (steps after the first).
//! Driven by `scripts/qlora_peak.sh`.

use std::time::Instant;

#[path = "../benches/qlora_support/mod.rs"]
mod support;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let name = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: qlora_peak CONFIG [STEPS]"))?;
    let steps: usize = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(3)
        .max(2);
    let (_, storage, ckpt) = support::CONFIGS
        .iter()
        .find(|c| c.0 == name)
        .copied()
        .ok_or_else(|| anyhow::anyhow!("unknown config {name}"))?;
    let mut w = support::Workload::new(storage, ckpt);
    let built = support::vm_hwm_kib().unwrap_or(0);
    let mut times = Vec::new();
    for _ in 0..steps {
        let t = Instant::now();
        let loss = w.step();
        anyhow::ensure!(loss.is_finite(), "loss is not finite");
        times.push(t.elapsed().as_secs_f64());
    }
    let peak = support::vm_hwm_kib().unwrap_or(0);
    let mean = times[1..].iter().sum::<f64>() / (times.len() - 1) as f64;
    println!(
        "{name}\t{:.0}\t{:.0}\t{:.0}\t{mean:.3}",
        w.model.frozen_bytes() as f64 / (1 << 20) as f64,
        built as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    Ok(())
}
