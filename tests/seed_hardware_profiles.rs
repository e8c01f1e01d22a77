//! The original project's unit cases for hardware profiles, one module per
//! class of cases, one `#[test]` per case.

#![allow(non_snake_case)]

use qlora_scale::scale::{scale_profile_map, scale_profile_map_for_category};
use qlora_scale::tables::{BATCH_SIZE_CAP, SIZE_CONFIGS};
use qlora_scale::{
    ChipVariant, Generation, Profile, SizeCategory, Tier, detect_model_size, optimized_profile,
    scale_profile_for_model,
};
use serde_json::{Map, Value, json};

const B: u64 = 1_000_000_000;

fn detect(name: &str) -> (SizeCategory, u64) {
    let s = detect_model_size(name);
    (s.category, s.params)
}

fn assert_size(name: &str, category: SizeCategory, billions: u64) {
    assert_eq!(detect(name), (category, billions * B), "detecting {name:?}");
}

fn large_profile() -> Profile {
    Profile {
        batch_size: 4,
        lora_rank: 128,
        lora_num_layers: 24,
        grad_checkpoint: false,
        model_tier: Tier::Large,
    }
}

fn medium_profile() -> Profile {
    Profile {
        batch_size: 2,
        lora_rank: 96,
        lora_num_layers: 16,
        grad_checkpoint: true,
        model_tier: Tier::Medium,
    }
}

fn entry_profile() -> Profile {
    Profile {
        batch_size: 1,
        lora_rank: 32,
        lora_num_layers: 8,
        grad_checkpoint: true,
        model_tier: Tier::Entry,
    }
}

fn triple(p: &Profile) -> (u32, u32, u32) {
    (p.batch_size, p.lora_rank, p.lora_num_layers)
}

fn map(v: Value) -> Map<String, Value> {
    v.as_object().expect("object").clone()
}

mod TestDetectModelSize {
    use super::*;

    #[test]
    fn test_detect_7b_model() {
        assert_size(
            "NousResearch/Hermes-2-Pro-Mistral-7B",
            SizeCategory::Small,
            7,
        );
    }

    #[test]
    fn test_detect_8b_model() {
        assert_size(
            "mlabonne/Meta-Llama-3.1-8B-Instruct-abliterated",
            SizeCategory::Small,
            8,
        );
    }

    #[test]
    fn test_detect_14b_model() {
        assert_size(
            "huihui-ai/DeepSeek-R1-Distill-Qwen-14B-abliterated-v2",
            SizeCategory::Medium,
            14,
        );
    }

    #[test]
    fn test_detect_32b_model() {
        assert_size(
            "huihui-ai/DeepSeek-R1-Distill-Qwen-32B-abliterated",
            SizeCategory::Large,
            32,
        );
    }

    #[test]
    fn test_detect_70b_model() {
        assert_size(
            "huihui-ai/DeepSeek-R1-Distill-Llama-70B-abliterated",
            SizeCategory::Xlarge,
            70,
        );
    }

    #[test]
    fn test_detect_via_regex_pattern() {
        assert_size(
            "cognitivecomputations/dolphin-2.9-llama3-8b",
            SizeCategory::Small,
            8,
        );
    }

    #[test]
    fn test_detect_hermes_70b() {
        assert_size(
            "NousResearch/Hermes-3-Llama-3.1-70B",
            SizeCategory::Xlarge,
            70,
        );
    }

    #[test]
    fn test_detect_unknown_model() {
        assert_size("some-org/unknown-model", SizeCategory::Small, 0);
    }

    #[test]
    fn test_detect_fallback_mistral() {
        assert_size("mistralai/Mistral-v0.1", SizeCategory::Small, 7);
    }
}

mod TestScaleProfileForModel {
    use super::*;

    #[test]
    fn test_scale_large_profile_for_small_model() {
        let s = scale_profile_for_model(&large_profile(), "NousResearch/Hermes-2-Pro-Mistral-7B");
        assert_eq!(triple(&s), (8, 32, 8));
    }

    #[test]
    fn test_scale_large_profile_for_phi2() {
        let s = scale_profile_for_model(&large_profile(), "microsoft/phi-2");
        assert_eq!(triple(&s), (8, 32, 8));
    }

    #[test]
    fn test_scale_large_profile_for_medium_model() {
        let s = scale_profile_for_model(
            &large_profile(),
            "huihui-ai/DeepSeek-R1-Distill-Qwen-14B-abliterated-v2",
        );
        assert_eq!((s.lora_rank, s.lora_num_layers), (48, 12));
        assert_eq!(s.batch_size, 6);
    }

    #[test]
    fn test_preserve_profile_for_matched_size() {
        let p = large_profile();
        let s = scale_profile_for_model(&p, "huihui-ai/DeepSeek-R1-Distill-Qwen-32B-abliterated");
        assert_eq!(s, p);
        let s = scale_profile_for_model(&p, "NousResearch/Hermes-3-Llama-3.1-70B");
        assert_eq!(s, p);
    }

    #[test]
    fn test_batch_size_capped() {
        let p = Profile {
            batch_size: 6,
            ..large_profile()
        };
        let s = scale_profile_for_model(&p, "mistralai/Mistral-7B-v0.1");
        assert_eq!(s.batch_size, 8);
    }

    #[test]
    fn test_original_profile_not_modified() {
        let original = map(
            json!({"model_tier": "large", "batch_size": 4, "lora_rank": 128,
                                  "lora_num_layers": 24, "grad_checkpoint": false}),
        );
        let before = original.clone();
        let scaled = scale_profile_map(&original, "mistralai/Mistral-7B-v0.1").unwrap();
        assert_eq!(original, before);
        assert_ne!(scaled, original);
        let typed = large_profile();
        let _ = scale_profile_for_model(&typed, "mistralai/Mistral-7B-v0.1");
        assert_eq!(typed, large_profile());
    }
}

mod TestModelSizeConfigs {
    use super::*;

    #[test]
    fn test_all_categories_defined() {
        let names: Vec<&str> = SizeCategory::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names, ["small", "medium", "large", "xlarge"]);
        for c in SizeCategory::ALL {
            assert_eq!(c.config().category, c);
            assert_eq!(SizeCategory::from_name(c.name()), Some(c));
        }
    }

    #[test]
    fn test_required_keys_present() {
        for c in SIZE_CONFIGS {
            assert!(c.lora_rank > 0, "{:?}", c.category);
            assert!(c.lora_num_layers > 0, "{:?}", c.category);
            assert!(c.batch_size_multiplier > 0.0, "{:?}", c.category);
            assert!(Tier::ALL.contains(&c.tier), "{:?}", c.category);
        }
    }

    #[test]
    fn test_progressive_scaling() {
        for w in SIZE_CONFIGS.windows(2) {
            assert!(w[0].lora_rank < w[1].lora_rank);
            assert!(w[0].lora_num_layers < w[1].lora_num_layers);
            assert!(w[0].tier <= w[1].tier);
        }
    }
}

mod TestDetectModelSizeEdgeCases {
    use super::*;

    #[test]
    fn test_very_large_100b() {
        assert_size("meta/llama-3-100b-instruct", SizeCategory::Xlarge, 100);
    }

    #[test]
    fn test_very_large_405b() {
        assert_size(
            "meta-llama/Meta-Llama-3.1-405B-Instruct",
            SizeCategory::Xlarge,
            405,
        );
    }

    #[test]
    fn test_decimal_version_llama_3_1_8b() {
        assert_size("meta/llama-3.1-8b", SizeCategory::Small, 8);
    }

    #[test]
    fn test_underscore_separator() {
        assert_size("org/model_7b_instruct", SizeCategory::Small, 7);
    }

    #[test]
    fn test_hyphen_separator() {
        assert_size("org/model-14b-chat", SizeCategory::Medium, 14);
    }

    #[test]
    fn test_spelled_out_billion() {
        assert_size("org/7billion-parameter-model", SizeCategory::Small, 7);
    }

    #[test]
    fn test_hyphen_before_b() {
        assert_size("org/model-7-b", SizeCategory::Small, 7);
    }

    #[test]
    fn test_underscore_before_b() {
        assert_size("org/model_7_b", SizeCategory::Small, 7);
    }

    #[test]
    fn test_fallback_phi_2() {
        assert_size("microsoft/phi-2", SizeCategory::Small, 3);
    }

    #[test]
    fn test_fallback_phi2() {
        assert_size("microsoft/phi2", SizeCategory::Small, 3);
    }

    #[test]
    fn test_fallback_qwen() {
        assert_size("Qwen/Qwen-Chat", SizeCategory::Small, 7);
    }

    #[test]
    fn test_fallback_llama3() {
        assert_size("meta/llama3-instruct", SizeCategory::Small, 8);
    }

    #[test]
    fn test_fallback_llama_dash_3() {
        assert_size("meta/llama-3-instruct", SizeCategory::Small, 8);
    }

    #[test]
    fn test_fallback_mistral() {
        assert_size("mistralai/Mistral-v0.1", SizeCategory::Small, 7);
    }

    #[test]
    fn test_fallback_order_follows_table_not_position() {
        // qwen appears first in the name, but phi-2 comes first in the table.
        assert_size("org/qwen-phi-2-merge", SizeCategory::Small, 3);
    }

    #[test]
    fn test_written_size_beats_fallback() {
        assert_size("mistralai/Mistral-Nemo-12B", SizeCategory::Medium, 12);
    }

    #[test]
    fn test_local_path() {
        assert_size("./models/mistral-7b", SizeCategory::Small, 7);
    }

    #[test]
    fn test_uppercase() {
        assert_size("org/MODEL-70B-INSTRUCT", SizeCategory::Xlarge, 70);
    }

    #[test]
    fn test_mixed_case() {
        assert_size("Org/Model-32B-Chat", SizeCategory::Large, 32);
    }

    #[test]
    fn test_empty_string() {
        assert_size("", SizeCategory::Small, 0);
    }

    #[test]
    fn test_multiple_numbers() {
        let (category, params) = detect("llama-3-8b-v2");
        assert_eq!(category, SizeCategory::Small);
        assert!(params == 3 * B || params == 8 * B, "got {params}");
    }

    #[test]
    fn test_single_b_without_number() {
        assert_size("org/bert-base", SizeCategory::Small, 0);
    }

    #[test]
    fn test_trailing_hyphen() {
        assert_size("org/model-7b-", SizeCategory::Small, 7);
    }

    #[test]
    fn test_b_followed_by_underscore() {
        assert_size("org/model-7b_chat", SizeCategory::Small, 7);
    }

    #[test]
    fn test_no_slash_organization_only() {
        assert_size("organization", SizeCategory::Small, 0);
    }

    #[test]
    fn test_boundary_10b_is_small() {
        assert_size("org/model-10b", SizeCategory::Small, 10);
    }

    #[test]
    fn test_boundary_11b_is_medium() {
        assert_size("org/model-11b", SizeCategory::Medium, 11);
    }

    #[test]
    fn test_boundary_20b_is_medium() {
        assert_size("org/model-20b", SizeCategory::Medium, 20);
    }

    #[test]
    fn test_boundary_21b_is_large() {
        assert_size("org/model-21b", SizeCategory::Large, 21);
    }

    #[test]
    fn test_boundary_50b_is_large() {
        assert_size("org/model-50b", SizeCategory::Large, 50);
    }

    #[test]
    fn test_boundary_51b_is_xlarge() {
        assert_size("org/model-51b", SizeCategory::Xlarge, 51);
    }
}

mod TestScaleProfileForModelAdvanced {
    use super::*;

    #[test]
    fn test_missing_model_tier() {
        let p = map(json!({"batch_size": 4, "lora_rank": 128, "lora_num_layers": 24}));
        let s = scale_profile_map(&p, "mistralai/Mistral-7B-v0.1").unwrap();
        assert_eq!(
            s, p,
            "a profile without a tier counts as entry and is not scaled"
        );
    }

    #[test]
    fn test_missing_batch_size() {
        let p = map(json!({"model_tier": "large", "lora_rank": 128, "lora_num_layers": 24}));
        let s = scale_profile_map(&p, "mistralai/Mistral-7B-v0.1").unwrap();
        // Missing batch counts as 2; 2 x 2.0 = 4.
        assert_eq!(s["batch_size"], 4);
        assert_eq!(s["lora_rank"], 32);
    }

    #[test]
    fn test_invalid_tier_name() {
        let p = map(
            json!({"model_tier": "gigantic", "batch_size": 4, "lora_rank": 128,
                           "lora_num_layers": 24}),
        );
        let s = scale_profile_map(&p, "mistralai/Mistral-7B-v0.1").unwrap();
        assert_eq!(s, p);
    }

    #[test]
    fn test_custom_keys_preserved() {
        let p = map(
            json!({"model_tier": "large", "batch_size": 4, "lora_rank": 128,
                           "lora_num_layers": 24, "learning_rate": 2e-4,
                           "notes": {"owner": "me"}}),
        );
        let s = scale_profile_map(&p, "mistralai/Mistral-7B-v0.1").unwrap();
        assert_eq!(s["learning_rate"], 2e-4);
        assert_eq!(s["notes"], json!({"owner": "me"}));
        assert_eq!(s.len(), p.len());
    }

    #[test]
    fn test_medium_to_small_scaling() {
        let s = scale_profile_for_model(&medium_profile(), "mistralai/Mistral-7B-v0.1");
        assert_eq!((s.lora_rank, s.lora_num_layers), (32, 8));
        assert_eq!(s.batch_size, 4);
    }

    #[test]
    fn test_large_batch_size_capped_at_8() {
        let p = Profile {
            batch_size: 16,
            ..large_profile()
        };
        let s = scale_profile_for_model(&p, "mistralai/Mistral-7B-v0.1");
        assert_eq!(s.batch_size, BATCH_SIZE_CAP);
        assert_eq!(s.batch_size, 8);
    }

    #[test]
    fn test_edge_3b_model() {
        let s = scale_profile_for_model(&large_profile(), "stabilityai/stablelm-3b");
        assert_eq!(triple(&s), (8, 32, 8));
    }

    #[test]
    fn test_edge_70b_model() {
        let s = scale_profile_for_model(&large_profile(), "meta-llama/Llama-2-70b-hf");
        assert_eq!(s, large_profile());
    }

    #[test]
    fn test_edge_14b_model() {
        let s = scale_profile_for_model(&large_profile(), "Qwen/Qwen2.5-14B");
        assert_eq!((s.lora_rank, s.lora_num_layers), (48, 12));
    }

    #[test]
    fn test_grad_checkpoint_preserved() {
        for gc in [true, false] {
            let p = Profile {
                grad_checkpoint: gc,
                ..large_profile()
            };
            assert_eq!(
                scale_profile_for_model(&p, "org/model-7b").grad_checkpoint,
                gc
            );
            let m = map(json!({"model_tier": "large", "batch_size": 4, "grad_checkpoint": gc}));
            let s = scale_profile_map(&m, "org/model-7b").unwrap();
            assert_eq!(s["grad_checkpoint"], gc);
        }
    }

    #[test]
    fn test_unknown_model() {
        let s = scale_profile_for_model(&medium_profile(), "some-org/unknown-model");
        assert_eq!((s.lora_rank, s.lora_num_layers), (32, 8));
    }
}

mod TestModelSizeConfigsComprehensive {
    use super::*;

    #[test]
    fn test_batch_size_multipliers_reasonable() {
        for c in SIZE_CONFIGS {
            assert!(c.batch_size_multiplier > 0.0 && c.batch_size_multiplier <= 3.0);
        }
    }

    #[test]
    fn test_ranks_increase_with_size() {
        let ranks: Vec<u32> = SIZE_CONFIGS.iter().map(|c| c.lora_rank).collect();
        assert!(ranks.windows(2).all(|w| w[0] < w[1]), "{ranks:?}");
    }

    #[test]
    fn test_layers_increase_with_size() {
        let layers: Vec<u32> = SIZE_CONFIGS.iter().map(|c| c.lora_num_layers).collect();
        assert!(layers.windows(2).all(|w| w[0] < w[1]), "{layers:?}");
    }

    #[test]
    fn test_ranks_in_reasonable_range() {
        for c in SIZE_CONFIGS {
            assert!((8..=256).contains(&c.lora_rank), "{c:?}");
        }
    }

    #[test]
    fn test_layers_in_reasonable_range() {
        for c in SIZE_CONFIGS {
            assert!((4..=40).contains(&c.lora_num_layers), "{c:?}");
        }
    }

    #[test]
    fn test_ranks_multiple_of_4() {
        for c in SIZE_CONFIGS {
            assert_eq!(c.lora_rank % 4, 0, "{c:?}");
        }
    }

    #[test]
    fn test_exact_config_values() {
        let got: Vec<(&str, u32, u32, f64, Tier)> = SIZE_CONFIGS
            .iter()
            .map(|c| {
                (
                    c.category.name(),
                    c.lora_rank,
                    c.lora_num_layers,
                    c.batch_size_multiplier,
                    c.tier,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("small", 32, 8, 2.0, Tier::Entry),
                ("medium", 48, 12, 1.5, Tier::Medium),
                ("large", 64, 16, 1.0, Tier::Large),
                ("xlarge", 128, 24, 1.0, Tier::Large),
            ]
        );
    }

    #[test]
    fn test_configs_immutable_between_accesses() {
        let first = *SizeCategory::Small.config();
        let _ = scale_profile_for_model(&large_profile(), "org/model-7b");
        let _ = scale_profile_map_for_category(
            &map(json!({"model_tier": "large", "batch_size": 4})),
            SizeCategory::Small,
        );
        assert_eq!(*SizeCategory::Small.config(), first);
        assert!(std::ptr::eq(
            SizeCategory::Small.config(),
            SizeCategory::Small.config()
        ));
    }

    #[test]
    fn test_categories_map_to_tiers() {
        let tiers: Vec<Tier> = SizeCategory::ALL.iter().map(|c| c.config().tier).collect();
        assert_eq!(tiers, [Tier::Entry, Tier::Medium, Tier::Large, Tier::Large]);
    }

    #[test]
    fn test_tier_order() {
        assert!(Tier::Entry < Tier::Medium && Tier::Medium < Tier::Large);
        assert_eq!(Tier::DEFAULT, Tier::Entry);
    }
}

mod TestModelSizeDetectionIntegration {
    use super::*;

    #[test]
    fn test_deepseek_variants() {
        assert_size(
            "huihui-ai/DeepSeek-R1-Distill-Qwen-7B",
            SizeCategory::Small,
            7,
        );
        assert_size(
            "huihui-ai/DeepSeek-R1-Distill-Qwen-14B",
            SizeCategory::Medium,
            14,
        );
        assert_size(
            "huihui-ai/DeepSeek-R1-Distill-Qwen-32B",
            SizeCategory::Large,
            32,
        );
        assert_size(
            "huihui-ai/DeepSeek-R1-Distill-Llama-70B",
            SizeCategory::Xlarge,
            70,
        );
    }

    #[test]
    fn test_llama_variants() {
        assert_size("meta-llama/Llama-2-7b-hf", SizeCategory::Small, 7);
        assert_size("meta-llama/Llama-2-13b-chat-hf", SizeCategory::Medium, 13);
        assert_size("meta-llama/Meta-Llama-3-8B", SizeCategory::Small, 8);
        assert_size("meta-llama/Meta-Llama-3.1-70B", SizeCategory::Xlarge, 70);
    }

    #[test]
    fn test_mistral_variants() {
        assert_size("mistralai/Mistral-7B-v0.1", SizeCategory::Small, 7);
        assert_size("mistralai/Mistral-7B-Instruct-v0.2", SizeCategory::Small, 7);
        assert_size(
            "NousResearch/Hermes-2-Pro-Mistral-7B",
            SizeCategory::Small,
            7,
        );
    }

    #[test]
    fn test_community_finetunes() {
        assert_size(
            "cognitivecomputations/dolphin-2.9-llama3-8b",
            SizeCategory::Small,
            8,
        );
        assert_size("TheBloke/Llama-2-70B-GGUF", SizeCategory::Xlarge, 70);
        assert_size(
            "NousResearch/Hermes-3-Llama-3.1-70B",
            SizeCategory::Xlarge,
            70,
        );
    }
}

mod TestScaleProfileEndToEnd {
    use super::*;

    #[test]
    fn test_m2_ultra_with_7b_model() {
        let hw = optimized_profile(Generation::M2, ChipVariant::Ultra, 192);
        assert_eq!(triple(&hw.profile), (8, 256, 32));
        let s = scale_profile_for_model(&hw.profile, "NousResearch/Hermes-2-Pro-Mistral-7B");
        assert_eq!(triple(&s), (8, 32, 8));
        assert_eq!(s.grad_checkpoint, hw.profile.grad_checkpoint);
    }

    #[test]
    fn test_m3_pro_with_14b_model() {
        let hw = optimized_profile(Generation::M3, ChipVariant::Pro, 36);
        assert_eq!(hw.profile.model_tier, Tier::Entry);
        let s = scale_profile_for_model(
            &hw.profile,
            "huihui-ai/DeepSeek-R1-Distill-Qwen-14B-abliterated-v2",
        );
        assert_eq!(s, hw.profile, "an entry profile is never scaled");
    }

    #[test]
    fn test_large_profile_with_3b_model() {
        let hw = optimized_profile(Generation::M2, ChipVariant::Ultra, 128);
        let s = scale_profile_for_model(&hw.profile, "org/model-3b");
        assert_eq!((s.lora_rank, s.lora_num_layers), (32, 8));
        assert_eq!(s.batch_size, 8);
    }

    #[test]
    fn test_entry_profile_flexibility() {
        let p = entry_profile();
        for name in [
            "org/model-3b",
            "org/model-7b",
            "org/model-14b",
            "org/model-32b",
            "org/model-70b",
            "org/model-405b",
            "some-org/unknown-model",
        ] {
            assert_eq!(scale_profile_for_model(&p, name), p, "{name}");
        }
    }
}
