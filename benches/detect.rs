//! Detection throughput over real public model ids, beside the naive runtime
//! approach of a direct port: `to_lowercase`, the `regex` crate with captures,
//! and scaling through a `HashMap<String, Value>` profile.
//!
//! Run: `cargo bench --bench detect`. Each iteration processes every id in
//! `benches/data/model_ids.txt`; criterion's throughput line gives names/s,
//! and time per name is the iteration time divided by the number of ids.

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use qlora_scale::{Profile, Tier, detect_model_size, scale_profile_for_model};
use regex::Regex;
use serde_json::Value;

fn ids() -> Vec<String> {
    include_str!("data/model_ids.txt")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

/// What a direct port of the reference does at run time.
struct NaiveDetector {
    size: Regex,
    fallbacks: Vec<(&'static str, f64)>,
}

impl NaiveDetector {
    fn new() -> Self {
        NaiveDetector {
            size: Regex::new(r"(\d+(?:\.\d+)?)[-_]?(?:billion|b)").unwrap(),
            fallbacks: vec![
                ("mistral", 7.0),
                ("llama-3", 8.0),
                ("llama3", 8.0),
                ("phi-2", 3.0),
                ("phi2", 3.0),
                ("qwen", 7.0),
            ],
        }
    }

    fn detect(&self, name: &str) -> (String, f64) {
        let last = name.rsplit('/').next().unwrap_or(name).to_lowercase();
        let params = match self.size.captures(&last) {
            Some(c) => c[1].parse().unwrap_or(0.0),
            None => self
                .fallbacks
                .iter()
                .find(|(s, _)| last.contains(s))
                .map_or(0.0, |(_, p)| *p),
        };
        let category = if params <= 10.0 {
            "small"
        } else if params <= 20.0 {
            "medium"
        } else if params <= 50.0 {
            "large"
        } else {
            "xlarge"
        };
        (category.to_string(), params)
    }

    fn scale(&self, profile: &HashMap<String, Value>, name: &str) -> HashMap<String, Value> {
        let configs: HashMap<&str, (u64, u64, f64, &str)> = [
            ("small", (32, 8, 2.0, "entry")),
            ("medium", (48, 12, 1.5, "medium")),
            ("large", (64, 16, 1.0, "large")),
            ("xlarge", (128, 24, 1.0, "large")),
        ]
        .into_iter()
        .collect();
        let order: HashMap<&str, u32> = [("entry", 0), ("medium", 1), ("large", 2)]
            .into_iter()
            .collect();
        let (category, _) = self.detect(name);
        let (rank, layers, mult, tier) = configs[category.as_str()];
        let mut out = profile.clone();
        let current = profile
            .get("model_tier")
            .and_then(Value::as_str)
            .and_then(|t| order.get(t))
            .copied()
            .unwrap_or(0);
        if current > order[tier] {
            let batch = profile
                .get("batch_size")
                .and_then(Value::as_u64)
                .unwrap_or(2);
            let scaled = ((batch as f64 * mult).floor() as u64).min(8);
            out.insert("batch_size".into(), scaled.into());
            out.insert("lora_rank".into(), rank.into());
            out.insert("lora_num_layers".into(), layers.into());
        }
        out
    }
}

fn bench(c: &mut Criterion) {
    let ids = ids();
    let n = ids.len() as u64;
    let naive = NaiveDetector::new();

    let mut g = c.benchmark_group("detect");
    g.throughput(Throughput::Elements(n));
    g.bench_function("qlora_scale (DFA)", |b| {
        b.iter(|| {
            for id in &ids {
                black_box(detect_model_size(black_box(id.as_str())));
            }
        })
    });
    g.bench_function("naive (regex + to_lowercase)", |b| {
        b.iter(|| {
            for id in &ids {
                black_box(naive.detect(black_box(id.as_str())));
            }
        })
    });
    g.finish();

    let profile = Profile {
        batch_size: 4,
        lora_rank: 128,
        lora_num_layers: 24,
        grad_checkpoint: false,
        model_tier: Tier::Large,
    };
    let map: HashMap<String, Value> = [
        ("batch_size", Value::from(4)),
        ("lora_rank", Value::from(128)),
        ("lora_num_layers", Value::from(24)),
        ("grad_checkpoint", Value::from(false)),
        ("model_tier", Value::from("large")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();

    let mut g = c.benchmark_group("detect+scale");
    g.throughput(Throughput::Elements(n));
    g.bench_function("qlora_scale (typed)", |b| {
        b.iter(|| {
            for id in &ids {
                black_box(scale_profile_for_model(
                    black_box(&profile),
                    black_box(id.as_str()),
                ));
            }
        })
    });
    g.bench_function("naive (HashMap<String, Value>)", |b| {
        b.iter(|| {
            for id in &ids {
                black_box(naive.scale(black_box(&map), black_box(id.as_str())));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
