//! Property tests: detection never panics and is consistent; scaling never
//! raises rank or layers, respects the cap, and keeps every other key.

use proptest::prelude::*;
use qlora_scale::scale::{scale_profile_map, scale_profile_map_for_category};
use qlora_scale::tables::BATCH_SIZE_CAP;
use qlora_scale::{
    Profile, SizeCategory, Tier, detect_model_size, scale_profile_for_category,
    scale_profile_for_model,
};
use serde_json::{Map, Value, json};

fn tier() -> impl Strategy<Value = Tier> {
    prop::sample::select(Tier::ALL.to_vec())
}

fn category() -> impl Strategy<Value = SizeCategory> {
    prop::sample::select(SizeCategory::ALL.to_vec())
}

fn profile() -> impl Strategy<Value = Profile> {
    (1u32..64, 1u32..512, 1u32..64, any::<bool>(), tier()).prop_map(|(b, r, l, g, t)| Profile {
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
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn detection_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let s = detect_model_size(&bytes[..]);
        prop_assert_eq!(s.category, SizeCategory::for_params(s.params));
    }

    #[test]
    fn detection_consistent_on_names(n in name()) {
        let s = detect_model_size(&n);
        prop_assert_eq!(s.category, SizeCategory::for_params(s.params));
        // Case does not matter.
        prop_assert_eq!(detect_model_size(&n.to_ascii_uppercase()), s);
        // Only the last path component matters.
        if !n.contains(['/', '\\']) && !n.is_empty() {
            prop_assert_eq!(detect_model_size(&format!("some/dir/{n}")), s);
            prop_assert_eq!(detect_model_size(&format!("C:\\x\\{n}\\")), s);
        }
    }

    #[test]
    fn scaling_never_raises_rank_or_layers(p in profile(), c in category()) {
        let s = scale_profile_for_category(p, c);
        prop_assert!(s.lora_rank <= p.lora_rank);
        prop_assert!(s.lora_num_layers <= p.lora_num_layers);
        prop_assert_eq!(s.grad_checkpoint, p.grad_checkpoint);
        prop_assert_eq!(s.model_tier, p.model_tier);
        if s != p {
            prop_assert!(s.batch_size <= BATCH_SIZE_CAP);
            prop_assert!(s.batch_size >= 1);
        }
        // Scaling twice changes nothing more than scaling once would, except
        // the batch size which is applied again.
        let twice = scale_profile_for_category(s, c);
        prop_assert_eq!((twice.lora_rank, twice.lora_num_layers), (s.lora_rank, s.lora_num_layers));
    }

    #[test]
    fn typed_and_named_scaling_agree(p in profile(), n in name()) {
        prop_assert_eq!(
            scale_profile_for_model(&p, &n),
            scale_profile_for_category(p, detect_model_size(&n).category)
        );
    }

    #[test]
    fn map_scaling_matches_typed_and_keeps_keys(
        p in profile(),
        c in category(),
        extra in prop::collection::btree_map("[a-z]{1,8}_x", any::<i32>(), 0..5),
    ) {
        let mut m = Map::new();
        m.insert("batch_size".into(), json!(p.batch_size));
        m.insert("lora_rank".into(), json!(p.lora_rank));
        m.insert("lora_num_layers".into(), json!(p.lora_num_layers));
        m.insert("grad_checkpoint".into(), json!(p.grad_checkpoint));
        m.insert("model_tier".into(), json!(p.model_tier.name()));
        for (k, v) in &extra {
            m.insert(k.clone(), json!(v));
        }
        let before = m.clone();
        let s = scale_profile_map_for_category(&m, c).unwrap();
        prop_assert_eq!(&m, &before);
        let typed = scale_profile_for_category(p, c);
        prop_assert_eq!(&s["batch_size"], &json!(typed.batch_size));
        prop_assert_eq!(&s["lora_rank"], &json!(typed.lora_rank));
        prop_assert_eq!(&s["lora_num_layers"], &json!(typed.lora_num_layers));
        for (k, v) in &extra {
            prop_assert_eq!(&s[k], &json!(v));
        }
        prop_assert_eq!(s.len(), m.len());
    }
}

#[test]
fn map_scaling_rejects_a_batch_that_is_not_a_count() {
    let m: Map<String, Value> = json!({"model_tier": "large", "batch_size": "four"})
        .as_object()
        .unwrap()
        .clone();
    let e = scale_profile_map(&m, "org/model-7b").unwrap_err();
    assert_eq!(
        e.to_string(),
        "profile key \"batch_size\" must be a non-negative integer, got \"four\""
    );
}
