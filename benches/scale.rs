//! Scaling a profile for a model, three ways, in one run:
//! a `#[derive(ScaledProfile)]` struct, the typed `scale_profile_for_model`
//! on `Profile`, and a dynamic `HashMap<String, serde_json::Value>` profile
//! (what a port of the dynamic original would do: look keys up by string,
//! convert JSON values, build a new map).
//!
//! Run: `cargo bench --bench scale`.

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use qlora_scale::tables::{BATCH_SIZE_CAP, DEFAULT_BATCH_SIZE};
use qlora_scale::{
    ScaledProfile, SizeCategory, Tier, detect_model_size, scale::keys, scale_profile_for_category,
    scale_profile_for_model,
};
use serde_json::Value;

#[derive(Clone, ScaledProfile)]
struct MyRun {
    batch_size: u32,
    lora_rank: u32,
    #[profile(key = "lora_num_layers")]
    layers: u16,
    grad_checkpoint: bool,
    #[profile(tier)]
    tier: Tier,
    learning_rate: f64,
}

const NAMES: [&str; 6] = [
    "meta-llama/Llama-2-7b-hf",
    "microsoft/phi-2",
    "huihui-ai/DeepSeek-R1-Distill-Qwen-14B",
    "Qwen/Qwen2.5-32B-Instruct",
    "meta-llama/Llama-2-70b-hf",
    "some-org/unknown-model",
];

/// Scaling on a string-keyed map: the same rule, the way a dynamic port
/// would write it.
fn scale_map(profile: &HashMap<String, Value>, name: &str) -> HashMap<String, Value> {
    scale_map_for_category(profile, detect_model_size(name).category)
}

/// The map version of `scale_profile_for_category`.
fn scale_map_for_category(
    profile: &HashMap<String, Value>,
    category: SizeCategory,
) -> HashMap<String, Value> {
    let config = category.config();
    let mut out = profile.clone();
    let tier = profile
        .get(keys::MODEL_TIER)
        .and_then(Value::as_str)
        .and_then(Tier::from_name)
        .unwrap_or(Tier::DEFAULT);
    if tier <= config.tier {
        return out;
    }
    let batch = profile
        .get(keys::BATCH_SIZE)
        .and_then(Value::as_u64)
        .unwrap_or(u64::from(DEFAULT_BATCH_SIZE));
    let scaled =
        ((batch as f64 * config.batch_size_multiplier) as u64).clamp(1, u64::from(BATCH_SIZE_CAP));
    out.insert(keys::BATCH_SIZE.to_string(), scaled.into());
    for (key, target) in [
        (keys::LORA_RANK, config.lora_rank),
        (keys::LORA_NUM_LAYERS, config.lora_num_layers),
    ] {
        let current = profile.get(key).and_then(Value::as_u64);
        let v = current.map_or(u64::from(target), |c| c.min(u64::from(target)));
        out.insert(key.to_string(), v.into());
    }
    out
}

fn bench(c: &mut Criterion) {
    let run = MyRun {
        batch_size: 4,
        lora_rank: 128,
        layers: 24,
        grad_checkpoint: false,
        tier: Tier::Large,
        learning_rate: 2e-4,
    };
    let profile = run.to_profile();
    let map: HashMap<String, Value> = [
        (keys::BATCH_SIZE, Value::from(4)),
        (keys::LORA_RANK, Value::from(128)),
        (keys::LORA_NUM_LAYERS, Value::from(24)),
        (keys::GRAD_CHECKPOINT, Value::from(false)),
        (keys::MODEL_TIER, Value::from("large")),
        ("learning_rate", Value::from(2e-4)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();

    // The three agree before they are timed.
    for name in NAMES {
        let typed = scale_profile_for_model(&profile, name);
        assert_eq!(run.scaled_for(name).to_profile(), typed);
        let m = scale_map(&map, name);
        assert_eq!(m[keys::LORA_RANK], typed.lora_rank);
        assert_eq!(m[keys::BATCH_SIZE], typed.batch_size);
    }

    let mut group = c.benchmark_group("scale 6 names");
    group.bench_function("derived", |b| {
        b.iter(|| {
            for name in NAMES {
                black_box(black_box(&run).scaled_for(black_box(name)));
            }
        })
    });
    group.bench_function("typed", |b| {
        b.iter(|| {
            for name in NAMES {
                black_box(scale_profile_for_model(
                    black_box(&profile),
                    black_box(name),
                ));
            }
        })
    });
    group.bench_function("hashmap", |b| {
        b.iter(|| {
            for name in NAMES {
                black_box(scale_map(black_box(&map), black_box(name)));
            }
        })
    });
    group.finish();

    // The same without detection: scaling for a known category, so the
    // profile handling itself is what is timed.
    let mut group = c.benchmark_group("scale for 4 categories");
    group.bench_function("derived", |b| {
        b.iter(|| {
            for category in SizeCategory::ALL {
                black_box(black_box(&run).scaled_for_category(black_box(category)));
            }
        })
    });
    group.bench_function("typed", |b| {
        b.iter(|| {
            for category in SizeCategory::ALL {
                black_box(scale_profile_for_category(
                    *black_box(&profile),
                    black_box(category),
                ));
            }
        })
    });
    group.bench_function("hashmap", |b| {
        b.iter(|| {
            for category in SizeCategory::ALL {
                black_box(scale_map_for_category(black_box(&map), black_box(category)));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
