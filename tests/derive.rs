//! `#[derive(ScaledProfile)]` gives the same results as
//! `scale_profile_for_model` on the equivalent `Profile`: every seed scaling
//! case, and random profiles and names; on generic, tuple, reordered and
//! narrow-integer structs, with extra fields preserved.

use proptest::prelude::*;
use qlora_scale::{
    Profile, ScaledProfile, SizeCategory, Tier, scale_profile_for_category, scale_profile_for_model,
};

/// The example, field for field.
#[derive(Clone, Debug, PartialEq, ScaledProfile)]
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

/// Keys in another order, narrow and wide integers, a field named like a key
/// but skipped, a non-`Copy` extra field.
#[derive(Clone, Debug, PartialEq, ScaledProfile)]
struct Reordered {
    notes: String,
    #[profile(tier)]
    size: Tier,
    lora_num_layers: u8,
    #[profile(skip)]
    grad_checkpoint: &'static str,
    lora_rank: u64,
    batch_size: usize,
}

/// Generic in a count and in an extra field.
#[derive(Clone, Debug, PartialEq, ScaledProfile)]
struct Generic<C, X>
where
    X: Clone,
{
    batch_size: C,
    lora_rank: C,
    lora_num_layers: C,
    model_tier: Tier,
    extra: X,
}

/// A tuple struct: every key named by attribute.
#[derive(Clone, Debug, PartialEq, ScaledProfile)]
struct Tuple(
    #[profile(key = "batch_size")] u16,
    #[profile(key = "lora_rank")] u32,
    #[profile(key = "lora_num_layers")] u32,
    #[profile(tier)] Tier,
    Vec<u8>,
);

fn my_run(p: &Profile) -> MyRun {
    MyRun {
        batch_size: p.batch_size,
        lora_rank: p.lora_rank,
        layers: p.lora_num_layers as u16,
        grad_checkpoint: p.grad_checkpoint,
        tier: p.model_tier,
        learning_rate: 2e-4,
    }
}

fn assert_same(p: &Profile, name: &str) {
    let expected = scale_profile_for_model(p, name);
    let got = my_run(p).scaled_for(name);
    assert_eq!(got.to_profile(), expected, "{p:?} for {name}");
    assert_eq!(got.learning_rate, 2e-4);
}

const LARGE: Profile = Profile {
    batch_size: 4,
    lora_rank: 128,
    lora_num_layers: 24,
    grad_checkpoint: false,
    model_tier: Tier::Large,
};

#[test]
fn seed_scaling_cases() {
    let cases: &[(Profile, &str, (u32, u32, u32))] = &[
        // Large profile + 7B: scaled down, batch doubled.
        (LARGE, "meta-llama/Llama-2-7b-hf", (8, 32, 8)),
        (LARGE, "mistralai/Mistral-7B-v0.1", (8, 32, 8)),
        // phi-2: detected by family.
        (LARGE, "microsoft/phi-2", (8, 32, 8)),
        // 14B: medium category.
        (LARGE, "huihui-ai/DeepSeek-R1-Distill-Qwen-14B", (6, 48, 12)),
        // 32B and 70B: unchanged.
        (LARGE, "Qwen/Qwen2.5-32B-Instruct", (4, 128, 24)),
        (LARGE, "meta-llama/Llama-2-70b-hf", (4, 128, 24)),
        // Batch 6 + 7B: capped at 8.
        (
            Profile {
                batch_size: 6,
                ..LARGE
            },
            "meta-llama/Llama-2-7b-hf",
            (8, 32, 8),
        ),
        // Medium profile + 7B or an unknown model: rank 32, layers 8.
        (
            Profile {
                batch_size: 2,
                lora_rank: 64,
                lora_num_layers: 16,
                grad_checkpoint: true,
                model_tier: Tier::Medium,
            },
            "meta-llama/Llama-2-7b-hf",
            (4, 32, 8),
        ),
        (
            Profile {
                batch_size: 2,
                lora_rank: 64,
                lora_num_layers: 16,
                grad_checkpoint: true,
                model_tier: Tier::Medium,
            },
            "some-org/unknown-model",
            (4, 32, 8),
        ),
    ];
    for (p, name, (batch, rank, layers)) in cases {
        assert_same(p, name);
        let s = my_run(p).scaled_for(*name);
        assert_eq!(
            (s.batch_size, s.lora_rank, u32::from(s.layers)),
            (*batch, *rank, *layers),
            "{name}"
        );
    }
    // Entry profiles are never changed, whatever the model.
    let entry = Profile {
        batch_size: 1,
        lora_rank: 16,
        lora_num_layers: 8,
        grad_checkpoint: true,
        model_tier: Tier::Entry,
    };
    for name in [
        "meta-llama/Llama-2-7b-hf",
        "microsoft/phi-2",
        "Qwen/Qwen2.5-0.5B",
        "meta-llama/Llama-2-70b-hf",
        "",
    ] {
        assert_same(&entry, name);
        assert_eq!(my_run(&entry).scaled_for(name), my_run(&entry));
    }
}

#[test]
fn fields_in_any_order_and_extra_fields_preserved() {
    let r = Reordered {
        notes: "kept".to_string(),
        size: Tier::Large,
        lora_num_layers: 24,
        grad_checkpoint: "not a key here",
        lora_rank: 128,
        batch_size: 4,
    };
    let s = r.scaled_for("meta-llama/Llama-2-7b-hf");
    assert_eq!(
        s,
        Reordered {
            notes: "kept".to_string(),
            size: Tier::Large,
            lora_num_layers: 8,
            grad_checkpoint: "not a key here",
            lora_rank: 32,
            batch_size: 8,
        }
    );
    // The skipped field does not feed the profile: it reads as absent.
    assert!(!r.to_profile().grad_checkpoint);
}

#[test]
fn generic_and_tuple_structs() {
    let g = Generic {
        batch_size: 4u64,
        lora_rank: 128,
        lora_num_layers: 24,
        model_tier: Tier::Large,
        extra: vec!["a"],
    };
    let s = g.scaled_for_category(SizeCategory::Medium);
    assert_eq!((s.batch_size, s.lora_rank, s.lora_num_layers), (6, 48, 12));
    assert_eq!(s.extra, vec!["a"]);

    let t = Tuple(4, 128, 24, Tier::Large, vec![1, 2]);
    assert_eq!(
        t.scaled_for("mistralai/Mistral-7B-v0.1"),
        Tuple(8, 32, 8, Tier::Large, vec![1, 2])
    );
}

#[test]
fn counts_saturate_both_ways() {
    // A u64 above u32::MAX reads as u32::MAX; results fit narrow fields.
    let g = Generic {
        batch_size: u64::MAX,
        lora_rank: u64::MAX,
        lora_num_layers: u64::MAX,
        model_tier: Tier::Enterprise,
        extra: (),
    };
    assert_eq!(g.to_profile().lora_rank, u32::MAX);
    let s = g.scaled_for_category(SizeCategory::Small);
    assert_eq!((s.batch_size, s.lora_rank, s.lora_num_layers), (8, 32, 8));
    let narrow = Generic {
        batch_size: 200u8,
        lora_rank: 255,
        lora_num_layers: 255,
        model_tier: Tier::Entry,
        extra: (),
    };
    let mut p = narrow.to_profile();
    p.lora_rank = 4096;
    assert_eq!(narrow.with_profile(&p).lora_rank, u8::MAX);
}

#[test]
fn profile_itself_is_a_scaled_profile() {
    let s = ScaledProfile::scaled_for(&LARGE, "meta-llama/Llama-2-7b-hf");
    assert_eq!(
        s,
        scale_profile_for_model(&LARGE, "meta-llama/Llama-2-7b-hf")
    );
}

/// Const profiles: scaled and asserted at compile time.
const SCALED_FOR_7B: Profile = scale_profile_for_category(LARGE, SizeCategory::Small);
const _: () = assert!(SCALED_FOR_7B.batch_size == 8);
const _: () = assert!(SCALED_FOR_7B.lora_rank == 32 && SCALED_FOR_7B.lora_num_layers == 8);
const ULTRA_96: Profile = qlora_scale::hardware_profile!(ultra, 96);
const M2_ULTRA_192: qlora_scale::HardwareProfile = qlora_scale::hardware_profile!(m2, ultra, 192);

#[test]
fn hardware_profile_macro_equals_the_runtime_lookup() {
    use qlora_scale::{ChipVariant, Generation, hardware, optimized_profile};
    assert_eq!(ULTRA_96, hardware::base_profile(ChipVariant::Ultra, 96));
    assert_eq!(
        M2_ULTRA_192,
        optimized_profile(Generation::M2, ChipVariant::Ultra, 192)
    );
    assert_eq!(M2_ULTRA_192.profile.lora_rank, 256);
}

fn tier() -> impl Strategy<Value = Tier> {
    prop::sample::select(Tier::ALL.to_vec())
}

fn profile() -> impl Strategy<Value = Profile> {
    (0u32..64, 1u32..512, 1u32..64, any::<bool>(), tier()).prop_map(|(b, r, l, g, t)| Profile {
        batch_size: b,
        lora_rank: r,
        lora_num_layers: l,
        grad_checkpoint: g,
        model_tier: t,
    })
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9./_-]{0,40}",
        "[a-z]{1,8}/[A-Za-z]{1,10}-[0-9]{1,3}(\\.[0-9])?[bBmM](-[a-z]{1,6})?",
        prop::sample::select(vec![
            "microsoft/phi-2".to_string(),
            "mistralai/Mixtral-8x7B-v0.1".to_string(),
            "Qwen/Qwen2.5-0.5B-Instruct".to_string(),
        ]),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn derive_equals_scale_profile_for_model(p in profile(), n in name()) {
        let expected = scale_profile_for_model(&p, &n);
        let run = MyRun { layers: p.lora_num_layers as u16, ..my_run(&p) };
        let got = run.scaled_for(&n);
        prop_assert_eq!(got.to_profile(), expected);
        prop_assert_eq!(got.learning_rate, run.learning_rate);

        let g = Generic {
            batch_size: u64::from(p.batch_size),
            lora_rank: u64::from(p.lora_rank),
            lora_num_layers: u64::from(p.lora_num_layers),
            model_tier: p.model_tier,
            extra: n.clone(),
        };
        let got = g.scaled_for(&n);
        prop_assert_eq!(
            (got.batch_size, got.lora_rank, got.lora_num_layers),
            (
                u64::from(expected.batch_size),
                u64::from(expected.lora_rank),
                u64::from(expected.lora_num_layers)
            )
        );
        prop_assert_eq!(got.extra, n);
    }
}
