//! The reference's hardware, recommendation and storage behaviour.

use qlora_scale::hardware::{base_profile, parse_sysctl, training_budget_gb};
use qlora_scale::recommend::{FitStatus, recommend};
use qlora_scale::saved_profile::{StoreError, load_profile, save_profile};
use qlora_scale::tables::{FALLBACK_PROFILE, KNOWN_ARCHITECTURES};
use qlora_scale::tables::{GPU_CORES, MEMORY_OPTIONS_GB};
use qlora_scale::{ChipVariant, Generation, Tier, optimized_profile};

use ChipVariant::{Base, Max, Pro, Ultra};

#[test]
fn gpu_cores_per_generation_and_variant() {
    let expect = [
        (Generation::M1, [8, 16, 32, 64]),
        (Generation::M2, [10, 19, 38, 76]),
        (Generation::M3, [10, 18, 40, 80]),
        (Generation::M4, [10, 20, 40, 80]),
    ];
    for (g, cores) in expect {
        for (v, c) in ChipVariant::ALL.iter().zip(cores) {
            assert_eq!(g.gpu_cores(*v), c, "{g} {v}");
        }
    }
    assert_eq!(GPU_CORES.len(), 4);
}

#[test]
fn memory_options() {
    assert_eq!(MEMORY_OPTIONS_GB[Base.index()], [8, 16, 24, 32]);
    assert_eq!(MEMORY_OPTIONS_GB[Pro.index()], [18, 32, 36, 48]);
    assert_eq!(MEMORY_OPTIONS_GB[Max.index()], [32, 36, 48, 64, 96, 128]);
    assert_eq!(MEMORY_OPTIONS_GB[Ultra.index()], [64, 96, 128, 192]);
}

#[test]
fn every_hardware_row() {
    let rows = [
        (Ultra, 192, 8, 256, 32, false, Tier::Large),
        (Ultra, 128, 6, 192, 28, false, Tier::Large),
        (Ultra, 96, 4, 128, 24, true, Tier::Large),
        (Ultra, 64, 4, 128, 20, false, Tier::Large),
        (Max, 128, 6, 192, 28, false, Tier::Large),
        (Max, 96, 4, 128, 24, false, Tier::Medium),
        (Max, 64, 4, 128, 20, false, Tier::Medium),
        (Max, 48, 2, 96, 16, true, Tier::Medium),
        (Max, 36, 2, 64, 16, true, Tier::Entry),
        (Max, 32, 2, 64, 16, true, Tier::Entry),
        (Pro, 48, 2, 96, 16, true, Tier::Medium),
        (Pro, 36, 2, 64, 16, true, Tier::Entry),
        (Pro, 32, 2, 64, 16, true, Tier::Entry),
        (Pro, 18, 1, 32, 12, true, Tier::Entry),
        (Base, 32, 2, 64, 16, true, Tier::Entry),
        (Base, 24, 2, 32, 12, true, Tier::Entry),
        (Base, 16, 1, 32, 8, true, Tier::Entry),
        (Base, 8, 1, 16, 4, true, Tier::Entry),
    ];
    for (v, mem, batch, rank, layers, gc, tier) in rows {
        let p = base_profile(v, mem);
        assert_eq!(
            (
                p.batch_size,
                p.lora_rank,
                p.lora_num_layers,
                p.grad_checkpoint,
                p.model_tier
            ),
            (batch, rank, layers, gc, tier),
            "{v} {mem}"
        );
    }
}

#[test]
fn m2_ultra_192() {
    let p = optimized_profile(Generation::M2, Ultra, 192);
    assert_eq!(p.training_budget_gb, 153);
    assert_eq!(p.gpu_cores, 76);
    assert_eq!(
        (p.generation, p.variant, p.memory_gb),
        (Generation::M2, Ultra, 192)
    );
    assert_eq!(p.profile.batch_size, 8);
}

#[test]
fn m2_base_16() {
    let p = optimized_profile(Generation::M2, Base, 16);
    assert_eq!(p.training_budget_gb, 12);
    assert_eq!(p.profile.batch_size, 1);
    assert!(p.profile.grad_checkpoint);
}

#[test]
fn memory_without_a_row_uses_the_nearest() {
    let p = optimized_profile(Generation::M2, Ultra, 200);
    assert_eq!(p.profile.lora_rank, 256, "uses the 192 row");
    assert_eq!(p.training_budget_gb, 160);
    let p = optimized_profile(Generation::M2, Ultra, 512);
    assert_eq!(p.training_budget_gb, 409);
    assert_eq!(p.profile.lora_rank, 256);
    // A tie (12 is 4 from both 16 and 8) takes the row listed first (16).
    assert_eq!(base_profile(Base, 12).lora_rank, 32);
    assert_eq!(base_profile(Base, 12).lora_num_layers, 8);
}

#[test]
fn gpu_core_batch_floors() {
    // M2 Max has 38 cores: its 48 GB row's batch 2 is raised to 3.
    assert_eq!(
        optimized_profile(Generation::M2, Max, 48)
            .profile
            .batch_size,
        3
    );
    // M1 Max has 32: unchanged.
    assert_eq!(
        optimized_profile(Generation::M1, Max, 48)
            .profile
            .batch_size,
        2
    );
    // M1 Ultra has 64: its 96 GB row's 4 stays 4; M3 Ultra 80: raised to 4 at least.
    assert_eq!(
        optimized_profile(Generation::M1, Ultra, 96)
            .profile
            .batch_size,
        4
    );
    assert_eq!(
        optimized_profile(Generation::M3, Max, 32)
            .profile
            .batch_size,
        3
    );
}

#[test]
fn budget() {
    assert_eq!(training_budget_gb(16), 12);
    assert_eq!(training_budget_gb(96), 76);
    assert_eq!(training_budget_gb(0), 0);
}

#[test]
fn sysctl_parsing() {
    let gib = |n: u64| (n << 30).to_string();
    let cases = [
        ("Apple M2 Ultra", 96, Generation::M2, Ultra),
        ("Apple M3 Pro", 36, Generation::M3, Pro),
        ("Apple M1", 16, Generation::M1, Base),
        ("Apple M4 Max", 64, Generation::M4, Max),
    ];
    for (brand, mem, g, v) in cases {
        let hw = parse_sysctl(brand, &gib(mem)).unwrap();
        assert_eq!(
            (hw.generation, hw.variant, hw.memory_gb),
            (Some(g), Some(v), mem as u32)
        );
        assert!(hw.profile().is_some());
    }
    let intel = parse_sysctl("Intel(R) Core(TM) i9-9980HK CPU @ 2.40GHz", &gib(32)).unwrap();
    assert_eq!(
        (intel.generation, intel.variant, intel.memory_gb),
        (None, None, 32)
    );
    assert!(intel.profile().is_none());
    assert_eq!(parse_sysctl("Apple M2 Ultra", ""), None);
    assert_eq!(parse_sysctl("Apple M2 Ultra", "lots"), None);
    // Memory is floored to whole GiB.
    let hw = parse_sysctl("Apple M1 Pro\n", &((16u64 << 30) + 12345).to_string()).unwrap();
    assert_eq!(hw.memory_gb, 16);
}

#[test]
fn recommendations_come_from_the_known_model_table() {
    let list = recommend(12, FALLBACK_PROFILE);
    assert_eq!(list.len(), KNOWN_ARCHITECTURES.len());
    let find = |id: &str| list.iter().find(|r| r.model.id == id).unwrap();
    let small = find("Qwen/Qwen2.5-0.5B");
    assert_eq!(small.status, FitStatus::Fits);
    assert_eq!(small.advice(), None);
    let big = find("meta-llama/Llama-3.1-70B");
    assert_eq!(big.status, FitStatus::DoesNotFit);
    assert!(big.estimated_peak_gb > big.limit_gb);
    // The verdict is the memory model's, at the share of the budget `train`
    // allows.
    assert!(
        (small.limit_gb - 12.0 * 0.85).abs() < 0.06,
        "{}",
        small.limit_gb
    );
    assert!(small.estimated_peak_gb <= small.limit_gb);
    // Fits first, largest first; misfits last, nearest first.
    for w in list.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        assert!(
            a.status < b.status
                || (a.status == b.status && a.status.fits() && a.params >= b.params)
                || (a.status == b.status
                    && !a.status.fits()
                    && a.estimated_peak_gb <= b.estimated_peak_gb),
            "{} before {}",
            a.model.id,
            b.model.id
        );
    }
}

#[test]
fn a_tight_fit_only_fits_at_micro_batch_one_with_checkpointing() {
    // A profile that trains with micro-batch 8 and no checkpointing.
    let roomy = qlora_scale::Profile {
        batch_size: 8,
        grad_checkpoint: false,
        ..FALLBACK_PROFILE
    };
    let budgets = 1..200;
    let tight = budgets
        .clone()
        .flat_map(|gb| recommend(gb, roomy))
        .find(|r| r.status == FitStatus::Tight)
        .expect("some budget makes some model a tight fit");
    assert_eq!((tight.run.batch, tight.run.grad_checkpoint), (1, true));
    assert!(tight.estimated_peak_gb <= tight.limit_gb);
    assert_eq!(
        tight.advice().as_deref(),
        Some("train with --batch-size 1 --grad-checkpoint")
    );
    // More memory never makes a model fit worse.
    let id = tight.model.id;
    let mut last = FitStatus::DoesNotFit;
    for gb in budgets {
        let r = recommend(gb, roomy)
            .into_iter()
            .find(|r| r.model.id == id)
            .unwrap();
        assert!(r.status <= last, "{id} at {gb} GB");
        last = r.status;
    }
}

#[test]
fn saved_profile_round_trip_and_atomicity() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/hardware_profile.json");
    assert!(
        load_profile(&path).unwrap().is_none(),
        "missing file is no profile"
    );
    let p = optimized_profile(Generation::M3, Max, 64);
    save_profile(&path, &p).unwrap();
    assert_eq!(load_profile(&path).unwrap(), Some(p));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(json["generation"], "m3");
    assert_eq!(json["variant"], "max");
    assert_eq!(json["model_tier"], "medium");
    assert_eq!(json["training_budget_gb"], 51);
    // Overwrite: no temporary files are left beside it.
    let q = optimized_profile(Generation::M1, Base, 8);
    save_profile(&path, &q).unwrap();
    assert_eq!(load_profile(&path).unwrap(), Some(q));
    let entries = std::fs::read_dir(path.parent().unwrap()).unwrap().count();
    assert_eq!(entries, 1);
    // Not the private mode of a temporary file: readable like any new file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_ne!(mode & 0o044, 0, "mode {mode:o}");
    }
}

#[test]
fn corrupt_profile_is_an_error_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hardware_profile.json");
    let garbage = b"{\"generation\": \"m9\", \"batch_size\": ";
    std::fs::write(&path, garbage).unwrap();
    let err = load_profile(&path).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }));
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("left untouched"), "{msg}");
    assert_eq!(std::fs::read(&path).unwrap(), garbage);

    std::fs::write(&path, br#"{"generation":"m7","variant":"max","memory_gb":1,"gpu_cores":1,"training_budget_gb":0,"batch_size":1,"lora_rank":8,"lora_num_layers":4,"grad_checkpoint":true,"model_tier":"entry"}"#).unwrap();
    let msg = qlora_scale::report::chain_message(&load_profile(&path).unwrap_err());
    assert!(
        msg.contains("unknown generation \"m7\" (known: m1, m2, m3, m4)"),
        "{msg}"
    );
}

#[test]
fn unreadable_profile_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    // A directory where the file should be: reading fails, not "no profile".
    let err = load_profile(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::Read { .. }), "{err}");
}
