//! Fits the memory model's coefficients (`tables/memory.toml`,
//! `[coefficients]`) to the trainer's measured peaks.
//!
//! ```text
//! scripts/memory_calibrate.sh                 # measure (writes the .jsonl)
//! cargo run --release --example memory_fit -- tests/data/memory_measurements.jsonl
//! ```
//!
//! Non-negative least squares on the relative error (every coefficient is a
//! count of copies, so none may be negative), by exact coordinate descent:
//! thirteen unknowns and a few dozen rows need nothing heavier. Each
//! configuration gives two rows: the peak while loading and, when training
//! set the run's peak, the training peak, on the backward transient
//! (the head's or a rebuilt block's) the previous fit says is larger,
//! refitted until no row changes branch. Prints the `[coefficients]` table,
//! the fit on every configuration, and each configuration's error when the
//! fit is made without it (leave-one-out), the honest figure for models not
//! measured.

use qlora_scale::memory::{Coefficients, Measurement, estimate_with, features};

const MIB: f64 = (1u64 << 20) as f64;
const K: usize = 13;
const NAMES: [&str; K] = [
    "runtime_mib",
    "load_tensor",
    "adapters",
    "logits_forward",
    "logits_backward",
    "head",
    "block_hidden",
    "block_intermediate",
    "block_attention",
    "checkpoint_hidden",
    "backward_hidden",
    "backward_intermediate",
    "backward_attention",
];

type Row = ([f64; K], f64, f64);

/// Design rows `(x, target, weight)`: predicted bytes beyond the frozen
/// weights are `x . c`, with `x[0]` in MiB for `runtime_mib`. A training
/// row takes the backward transient `c` says is the larger (the head's, or
/// a rebuilt block's).
fn rows(ms: &[Measurement], c: Option<&Coefficients>) -> Vec<Row> {
    let mut out = Vec::new();
    for m in ms {
        let f = features(&m.architecture(), &m.run());
        let load = m.measured_load_mib * MIB;
        let mut x = [0.0; K];
        x[0] = MIB;
        x[1] = f.largest_tensor;
        out.push((x, load - f.frozen, load));
        // The run's peak is the training peak unless loading set it.
        let peak = m.measured_peak_mib * MIB;
        if peak > load * 1.02 {
            let block = c.is_some_and(|c| {
                c.block_hidden * f.recompute_hidden
                    + c.block_intermediate * f.recompute_intermediate
                    + c.block_attention * f.recompute_attention
                    + c.backward_hidden * f.backward_hidden
                    + c.backward_intermediate * f.backward_intermediate
                    + c.backward_attention * f.backward_attention
                    > c.logits_backward * f.logits + c.head * f.head
            });
            let (h, r) = if block { (0.0, 1.0) } else { (1.0, 0.0) };
            let x = [
                MIB,
                0.0,
                f.adapters,
                f.logits,
                h * f.logits,
                h * f.head,
                f.block_hidden + r * f.recompute_hidden,
                f.block_intermediate + r * f.recompute_intermediate,
                f.block_attention + r * f.recompute_attention,
                f.checkpoint_hidden,
                r * f.backward_hidden,
                r * f.backward_intermediate,
                r * f.backward_attention,
            ];
            out.push((x, peak - f.frozen, peak));
        }
    }
    out
}

/// Fits the piecewise model: linear fits, each row on the branch the last
/// fit chose, until the branches stop changing.
fn fit(ms: &[Measurement]) -> [f64; K] {
    let mut c = nnls(&rows(ms, None));
    for _ in 0..20 {
        let next = nnls(&rows(ms, Some(&coefficients(&c))));
        let same = next == c;
        c = next;
        if same {
            break;
        }
    }
    c
}

fn nnls(rows: &[Row]) -> [f64; K] {
    let mut c = [0.0f64; K];
    // Rows scaled by 1/measured: the squares are relative errors.
    let a: Vec<[f64; K]> = rows.iter().map(|(x, _, w)| x.map(|v| v / w)).collect();
    let b: Vec<f64> = rows.iter().map(|(_, y, w)| y / w).collect();
    let norms: Vec<f64> = (0..K)
        .map(|k| a.iter().map(|r| r[k] * r[k]).sum())
        .collect();
    let mut resid: Vec<f64> = b.clone();
    for _ in 0..100_000 {
        let mut moved = 0.0f64;
        for k in 0..K {
            if norms[k] == 0.0 {
                continue;
            }
            let g: f64 = a.iter().zip(&resid).map(|(r, e)| r[k] * e).sum();
            let new = (c[k] + g / norms[k]).max(0.0);
            let d = new - c[k];
            if d != 0.0 {
                for (r, e) in a.iter().zip(resid.iter_mut()) {
                    *e -= r[k] * d;
                }
                c[k] = new;
                moved = moved.max(d.abs() / new.abs().max(1e-9));
            }
        }
        if moved < 1e-12 {
            break;
        }
    }
    c
}

fn coefficients(c: &[f64; K]) -> Coefficients {
    Coefficients {
        runtime_mib: c[0],
        load_tensor: c[1],
        adapters: c[2],
        logits_forward: c[3],
        logits_backward: c[4],
        head: c[5],
        block_hidden: c[6],
        block_intermediate: c[7],
        block_attention: c[8],
        checkpoint_hidden: c[9],
        backward_hidden: c[10],
        backward_intermediate: c[11],
        backward_attention: c[12],
    }
}

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tests/data/memory_measurements.jsonl".into());
    let ms = Measurement::read_all(std::path::Path::new(&path)).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        ms.len() >= 6,
        "{path}: {} configurations, need at least 6",
        ms.len()
    );
    let c = fit(&ms);
    println!("[coefficients]");
    for (name, v) in NAMES.iter().zip(c) {
        // Rounded up a little: the model should err on the side of caution.
        println!("{name} = {:.3}", (v * 1000.0).ceil() / 1000.0);
    }
    let rounded = coefficients(&c.map(|v| (v * 1000.0).ceil() / 1000.0));
    println!();
    println!(
        "| model | batch x seq | rank | layers | ckpt | predicted MiB | measured MiB | error | leave-one-out error |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut worst = (0.0f64, 0.0f64);
    for (i, m) in ms.iter().enumerate() {
        let e = estimate_with(&rounded, &m.architecture(), &m.run());
        let err = e.peak_mib() / m.measured_peak_mib - 1.0;
        let others: Vec<Measurement> = ms
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, m)| m.clone())
            .collect();
        let loo = coefficients(&fit(&others));
        let le =
            estimate_with(&loo, &m.architecture(), &m.run()).peak_mib() / m.measured_peak_mib - 1.0;
        worst = (worst.0.max(err.abs()), worst.1.max(le.abs()));
        println!(
            "| {} | {} x {} | {} | {} | {} | {:.0} | {:.0} | {:+.1}% | {:+.1}% |",
            m.name,
            m.batch_size,
            m.seq_len,
            m.lora_rank,
            m.lora_layers,
            if m.grad_checkpoint { "on" } else { "off" },
            e.peak_mib(),
            m.measured_peak_mib,
            100.0 * err,
            100.0 * le
        );
    }
    println!();
    println!(
        "worst error {:.1}%, worst leave-one-out error {:.1}% over {} configurations",
        100.0 * worst.0,
        100.0 * worst.1,
        ms.len()
    );
    Ok(())
}
