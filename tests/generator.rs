//! The table generator, run directly: the real tables generate the committed
//! snapshot, and broken tables give exact `tables/FILE.toml:LINE:COL` errors,
//! all at once.
//!
//! To accept a change of the generated code after editing `tables/` or
//! `build/`, run `BLESS=1 cargo test --test generator` and review the diff of
//! `tests/snapshots/generated_tables.rs`.

#[allow(dead_code, clippy::all)]
#[path = "../build/mod.rs"]
mod generator;

use std::path::{Path, PathBuf};

use generator::{Endian, generate, model::FILES};

fn tables_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tables")
}

/// A copy of the real tables with `edits` applied: (file, from, to); each
/// `from` must occur exactly once.
fn broken(edits: &[(&str, &str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in FILES {
        let mut text = std::fs::read_to_string(tables_dir().join(name)).unwrap();
        for (file, from, to) in edits {
            if *file == name {
                assert_eq!(
                    text.matches(from).count(),
                    1,
                    "edit {from:?} must match once in {file}"
                );
                text = text.replacen(from, to, 1);
            }
        }
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

fn errors(edits: &[(&str, &str, &str)]) -> Vec<String> {
    let dir = broken(edits);
    match generate(dir.path(), Endian::Little) {
        Ok(_) => panic!("tables with {edits:?} were accepted"),
        Err(e) => e.iter().map(|d| d.to_string()).collect(),
    }
}

#[test]
fn real_tables_generate_the_committed_snapshot() {
    let out = generate(&tables_dir(), Endian::Little).expect("the real tables are valid");
    let snapshot =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots/generated_tables.rs");
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(&snapshot, &out.rust).unwrap();
    }
    let committed = std::fs::read_to_string(&snapshot).unwrap_or_default();
    assert!(
        committed == out.rust,
        "generated code differs from {}; review and run with BLESS=1",
        snapshot.display()
    );
    assert!(out.rust.starts_with("// @generated"));
    assert_eq!(out.dfas.len(), 2);
    assert!(out.dfas.iter().all(|(_, bytes)| !bytes.is_empty()));
    assert_eq!(out.inputs.len(), FILES.len());
}

#[test]
fn generation_is_deterministic_and_endian_aware() {
    let a = generate(&tables_dir(), Endian::Little).unwrap();
    let b = generate(&tables_dir(), Endian::Little).unwrap();
    assert_eq!(a.rust, b.rust);
    assert_eq!(a.dfas, b.dfas);
    let big = generate(&tables_dir(), Endian::Big).unwrap();
    assert_eq!(a.rust, big.rust);
    assert_ne!(
        a.dfas, big.dfas,
        "DFAs are serialised for the target's byte order"
    );
}

#[test]
fn duplicate_category() {
    assert_eq!(
        errors(&[("size.toml", "name = \"medium\"", "name = \"small\"")]),
        ["tables/size.toml:17:8: duplicate category \"small\" (first at 9:8)"]
    );
}

#[test]
fn thresholds_must_ascend() {
    assert_eq!(
        errors(&[("size.toml", "max_params_b = 20", "max_params_b = 10")]),
        [
            "tables/size.toml:18:16: max_params_b 10 of \"medium\" must be above the previous category's 10 (thresholds ascend)"
        ]
    );
}

#[test]
fn rank_rules_all_reported_at_once() {
    assert_eq!(
        errors(&[
            ("size.toml", "lora_rank = 48", "lora_rank = 30"),
            ("size.toml", "lora_rank = 128", "lora_rank = 512"),
        ]),
        [
            "tables/size.toml:19:13: lora_rank 30 must be a multiple of 4",
            "tables/size.toml:19:13: lora_rank 30 of \"medium\" must be above 32 of \"small\" (ranks strictly increase with size)",
            "tables/size.toml:34:13: lora_rank is 512, must be in 8..=256",
        ]
    );
}

#[test]
fn layers_must_increase() {
    assert_eq!(
        errors(&[("size.toml", "lora_num_layers = 16", "lora_num_layers = 12")]),
        [
            "tables/size.toml:28:19: lora_num_layers 12 of \"large\" must be above 12 of \"medium\" (layers strictly increase with size)"
        ]
    );
}

#[test]
fn multiplier_out_of_range() {
    assert_eq!(
        errors(&[(
            "size.toml",
            "batch_size_multiplier = 1.5",
            "batch_size_multiplier = 3.5"
        )]),
        ["tables/size.toml:21:25: batch_size_multiplier is 3.5, must be in (0, 3]"]
    );
}

#[test]
fn unknown_tier() {
    assert_eq!(
        errors(&[("size.toml", "tier = \"medium\"", "tier = \"huge\"")]),
        ["tables/size.toml:22:8: unknown tier \"huge\" (known: entry, medium, large, enterprise)"]
    );
}

#[test]
fn last_category_must_be_unbounded() {
    assert_eq!(
        errors(&[(
            "size.toml",
            "name = \"xlarge\"\n",
            "name = \"xlarge\"\nmax_params_b = 100\n"
        )]),
        [
            "tables/size.toml:34:16: the last category \"xlarge\" takes every larger size and must not set max_params_b"
        ]
    );
}

/// 1-based line of the line of a real table that is exactly `line`.
fn line_of(file: &str, line: &str) -> usize {
    let text = std::fs::read_to_string(tables_dir().join(file)).unwrap();
    text.lines().position(|l| l == line).expect("line present") + 1
}

#[test]
fn family_that_can_never_match() {
    // Computed, so that adding models to the table does not break the test.
    let phi2 = line_of("known_models.toml", "substring = \"phi2\"");
    let mistral = line_of("known_models.toml", "substring = \"mistral\"");
    assert_eq!(
        errors(&[(
            "known_models.toml",
            "substring = \"phi2\"",
            "substring = \"mistral-7\""
        )]),
        [format!(
            "tables/known_models.toml:{phi2}:13: family \"mistral-7\" can never match: every name containing it also contains \"mistral\" (at {mistral}:13), which comes first"
        )]
    );
}

#[test]
fn invalid_regex() {
    let e = errors(&[(
        "detect.toml",
        "regex = '(?:1|2|4|8|16|20|32|40|64|80|100|128|160|200|256|512|1000|1024)k(?:[^a-z]|$)'",
        "regex = '(?:2|4k(?:[^a-z]|$)'",
    )]);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0] == "tables/detect.toml:24:9: invalid regex: unclosed group",
        "{e:?}"
    );
}

#[test]
fn pattern_matching_empty_string() {
    assert_eq!(
        errors(&[(
            "detect.toml",
            "regex = '(?:1|2|4|8|16|20|32|40|64|80|100|128|160|200|256|512|1000|1024)k(?:[^a-z]|$)'",
            "regex = 'k?'",
        )]),
        ["tables/detect.toml:24:9: pattern can match the empty string"]
    );
}

#[test]
fn unknown_key_is_reported_with_position() {
    let e = errors(&[(
        "size.toml",
        "lora_num_layers = 8\n",
        "lora_num_layers = 8\nlora_ranks = 3\n",
    )]);
    assert_eq!(
        e,
        [
            "tables/size.toml:13:1: unknown field `lora_ranks`, expected one of `name`, `max_params_b`, `lora_rank`, `lora_num_layers`, `batch_size_multiplier`, `tier`"
        ]
    );
}

#[test]
fn toml_duplicate_key() {
    let e = errors(&[(
        "defaults.toml",
        "lora_alpha_per_rank = 2.0\n",
        "lora_alpha_per_rank = 2.0\nlora_alpha_per_rank = 3.0\n",
    )]);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("tables/defaults.toml:"), "{e:?}");
    assert!(e[0].contains("duplicate key"), "{e:?}");
}

#[test]
fn hardware_errors() {
    assert_eq!(
        errors(&[
            (
                "hardware.toml",
                "gpu_cores = { base = 8, pro = 16, max = 32, ultra = 64 }",
                "gpu_cores = { base = 8, pro = 16, max = 32, ulta = 64 }"
            ),
            (
                "hardware.toml",
                "variant = \"pro\"\nmemory_gb = 18",
                "variant = \"pro\"\nmemory_gb = 32"
            ),
            (
                "hardware.toml",
                "budget_fraction = 0.8",
                "budget_fraction = 1.8"
            ),
        ]),
        [
            "tables/hardware.toml:6:19: budget_fraction is 1.8, must be in (0, 1]",
            "tables/hardware.toml:20:13: gpu_cores of \"m1\" has no entry for variant \"ultra\"",
            "tables/hardware.toml:20:52: gpu_cores names unknown variant \"ulta\" (known: base, pro, max, ultra)",
            "tables/hardware.toml:179:1: duplicate profile for (variant, memory_gb) \"pro 32\" (first at 170:1)",
        ]
    );
}

/// 1-based line `offset` lines below the line of a real table that is
/// exactly `marker`.
fn line_below(file: &str, marker: &str, offset: usize) -> usize {
    line_of(file, marker) + offset
}

#[test]
fn gpu_and_cpu_row_errors_all_reported_at_once() {
    const H: &str = "hardware.toml";
    let gpu8 = line_below(
        H,
        "# 8 GB (RTX 3070/4060): a 7B model at batch 1 with checkpointing, few layers.",
        2,
    );
    let gpu12 = line_below(
        H,
        "# 12 GB (RTX 3060/4070): 7B with room for more layers.",
        2,
    );
    let gpu40 = line_below(H, "# 40 GB (A100 40GB): 30-34B, or 13B at larger batch.", 2);
    let gpu80 = line_below(
        H,
        "# 80 GB (A100 80GB, H100): 70B at batch 8; checkpointing stays on, since a",
        3,
    );
    let cpu64 = line_below(H, "# 64 GB: 13-14B.", 2);
    let cpu256 = line_below(H, "# 256 GB: 70B with more layers and rank.", 2);
    let gpu_budget = line_of(H, "budget_fraction = 0.9");
    let sve = line_of(H, "flags = [\"sve\"]");
    let asimd = line_of(H, "flags = [\"asimd\", \"neon\"]");
    // The `variant` line added to the 80 GB row moves every later line down.
    let (cpu64, cpu256, sve, asimd) = (cpu64 + 1, cpu256 + 1, sve + 1, asimd + 1);
    assert_eq!(
        errors(&[
            (H, "budget_fraction = 0.9", "budget_fraction = 1.5"),
            (H, "memory_gb = 12\n", "memory_gb = 8\n"),
            (
                H,
                "memory_gb = 40\nbatch_size = 4\nlora_rank = 96",
                "memory_gb = 40\nbatch_size = 4\nlora_rank = 48"
            ),
            (
                H,
                "[[gpu.profile]]\nmemory_gb = 80",
                "[[gpu.profile]]\nvariant = \"max\"\nmemory_gb = 80"
            ),
            (
                H,
                "memory_gb = 64\nbatch_size = 2\nlora_rank = 64\nlora_num_layers = 16\ngrad_checkpoint = true\ntier = \"medium\"\n\n# 128",
                "memory_gb = 64\nbatch_size = 2\nlora_rank = 64\nlora_num_layers = 16\ngrad_checkpoint = true\ntier = \"huge\"\n\n# 128"
            ),
            (H, "memory_gb = 256", "memory_gb = 100"),
            (H, "flags = [\"sve\"]", "flags = [\"asimd\"]"),
        ]),
        [
            format!(
                "tables/hardware.toml:{gpu_budget}:19: [gpu] budget_fraction is 1.5, must be in (0, 1]"
            ),
            format!(
                "tables/hardware.toml:{gpu12}:13: duplicate [[gpu.profile]] row for memory_gb 8 (first at {gpu8}:13)"
            ),
            format!(
                "tables/hardware.toml:{}:13: lora_rank 48 of the 40 GB row is below 64 of the 24 GB row (profiles must not shrink as memory grows)",
                gpu40 + 2
            ),
            format!(
                "tables/hardware.toml:{gpu80}:11: a [[gpu.profile]] row is chosen by memory alone and must not name a variant"
            ),
            format!(
                "tables/hardware.toml:{}:8: unknown tier \"huge\" (known: entry, medium, large, enterprise)",
                cpu64 + 5
            ),
            format!(
                "tables/hardware.toml:{cpu256}:13: memory_gb 100 is below 128 of the row before (rows are listed smallest memory first)"
            ),
            format!(
                "tables/hardware.toml:{sve}:10: duplicate cpuinfo flag \"asimd\" (first at {asimd}:10)"
            ),
        ]
    );
}

#[test]
fn a_gpu_or_cpu_section_needs_rows() {
    let e = errors(&[(
        "hardware.toml",
        "[[cpu.profile]]\nmemory_gb = 8\n",
        "[[cpu.profile]]\n",
    )]);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].ends_with(": a [[cpu.profile]] row needs memory_gb"),
        "{e:?}"
    );
}

#[test]
fn errors_from_several_files_at_once() {
    let e = errors(&[
        ("size.toml", "[scaling]", "[scaling"),
        ("defaults.toml", "[train]", "[train"),
    ]);
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e[0].starts_with("tables/size.toml:"), "{e:?}");
    assert!(e[1].starts_with("tables/defaults.toml:"), "{e:?}");
}

#[test]
fn missing_file() {
    let dir = broken(&[]);
    std::fs::remove_file(dir.path().join("defaults.toml")).unwrap();
    let e: Vec<String> = generate(dir.path(), Endian::Little)
        .err()
        .unwrap()
        .iter()
        .map(|d| d.to_string())
        .collect();
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("tables/defaults.toml: cannot read: "),
        "{e:?}"
    );
}

#[test]
fn pattern_must_start_with_a_digit() {
    assert_eq!(
        errors(&[(
            "detect.toml",
            "regex = '(?:1|2|4|8|16|20|32|40|64|80|100|128|160|200|256|512|1000|1024)k(?:[^a-z]|$)'",
            "regex = '-?(?:2|4)k'",
        )]),
        [
            "tables/detect.toml:24:9: pattern must start with an ASCII digit (the DFA is run from the start of each digit run)"
        ]
    );
}

#[test]
fn profile_key_rules_all_reported_at_once() {
    assert_eq!(
        errors(&[
            (
                "profile.toml",
                "name = \"lora_rank\"",
                "name = \"batch_size\""
            ),
            ("profile.toml", "kind = \"flag\"", "kind = \"switch\""),
            (
                "profile.toml",
                "doc = \"LoRA rank; lowered to the size category's rank when scaled down.\"",
                "doc = \"  \""
            ),
        ]),
        [
            "tables/profile.toml:25:8: duplicate profile key \"batch_size\" (first at 18:8)",
            "tables/profile.toml:29:7: doc of key \"batch_size\" must be one non-empty line",
            "tables/profile.toml:40:8: unknown key kind \"switch\" (known: count, flag, tier)",
        ]
    );
}

#[test]
fn an_overriding_family_is_not_shadowed_by_an_earlier_fallback() {
    // "gpt2-xl-7b" contains "gpt2-xl" (a fallback, listed earlier), but an
    // overriding family is consulted first, so it can still match.
    let dir = broken(&[(
        "known_models.toml",
        "# The reference rule's fallbacks",
        "[[family]]\nsubstring = \"gpt2-xl-7b\"\nparams_b = 7\noverride = true\nsource = \"test\"\n\n# The reference rule's fallbacks",
    )]);
    assert!(generate(dir.path(), Endian::Little).is_ok());
    // The other way round it is shadowed.
    let e = errors(&[(
        "known_models.toml",
        "# The reference rule's fallbacks",
        "[[family]]\nsubstring = \"command-r7b-x\"\nparams_b = 7\nsource = \"test\"\n\n# The reference rule's fallbacks",
    )]);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains("family \"command-r7b-x\" can never match"),
        "{e:?}"
    );
}

#[test]
fn exactly_one_tier_key() {
    assert_eq!(
        errors(&[("profile.toml", "kind = \"flag\"", "kind = \"tier\"")]),
        [
            "tables/profile.toml:47:8: key \"model_tier\" is a second key of kind \"tier\" (first at 40:8); #[profile(tier)] must name one key"
        ]
    );
    assert_eq!(
        errors(&[("profile.toml", "kind = \"tier\"", "kind = \"count\"")]),
        ["tables/profile.toml:1:1: no [[key]] of kind \"tier\": scaling needs the profile's tier"]
    );
}

#[test]
fn moe_total_above_the_product() {
    let e = errors(&[(
        "detect.toml",
        "total_params_b = 46.7",
        "total_params_b = 60",
    )]);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains("total_params_b 60 is above experts x expert_params_b"),
        "{e:?}"
    );
}

#[test]
fn tier_key_must_be_in_profile_and_names_identifiers() {
    assert_eq!(
        errors(&[
            (
                "profile.toml",
                "kind = \"tier\"\nrequired = true\nin_profile = true",
                "kind = \"tier\"\nrequired = true\nin_profile = false"
            ),
            (
                "profile.toml",
                "name = \"lora_rank\"",
                "name = \"LoRA rank\""
            ),
        ]),
        [
            "tables/profile.toml:25:8: profile key \"LoRA rank\" must be lower-case ASCII letters, digits and '_', starting with a letter",
            "tables/profile.toml:49:14: the tier key \"model_tier\" must have in_profile = true: scaling reads it",
        ]
    );
}

#[test]
fn macro_schema_comes_from_the_same_tables() {
    let schema = generator::macro_schema(&tables_dir()).expect("the real tables are valid");
    assert!(schema.rust.starts_with("// @generated"));
    assert!(schema.rust.contains("name: \"lora_num_layers\""));
    assert!(schema.rust.contains("kind: KeyKind::Tier"));
    assert_eq!(schema.inputs.len(), FILES.len());
    // A key added to the tables reaches the macros' schema.
    let dir = broken(&[(
        "profile.toml",
        "[[key]]\nname = \"batch_size\"",
        "[[key]]\nname = \"eval_batch_size\"\nkind = \"count\"\nrequired = false\nin_profile = false\ndoc = \"Examples per evaluation step.\"\n\n[[key]]\nname = \"batch_size\"",
    )]);
    let schema = generator::macro_schema(dir.path()).unwrap();
    assert!(schema.rust.contains("name: \"eval_batch_size\""));
    // And a broken table stops the macros' build the same way.
    let dir = broken(&[("profile.toml", "kind = \"flag\"", "kind = \"switch\"")]);
    let e = generator::macro_schema(dir.path()).err().unwrap();
    assert_eq!(
        e[0].to_string(),
        "tables/profile.toml:40:8: unknown key kind \"switch\" (known: count, flag, tier)"
    );
}

#[test]
fn pattern_look_around_other_than_end() {
    assert_eq!(
        errors(&[(
            "detect.toml",
            "regex = '(?:1|2|4|8|16|20|32|40|64|80|100|128|160|200|256|512|1000|1024)k(?:[^a-z]|$)'",
            "regex = '(?:1|2|4)k\\b'",
        )]),
        ["tables/detect.toml:24:9: pattern may use no look-around but `$` (the end of the name)"]
    );
}

#[test]
fn memory_table_errors_all_reported_at_once() {
    let errs = errors(&[
        (
            "memory.toml",
            "estimate_share = 0.85",
            "estimate_share = 0.0",
        ),
        ("memory.toml", "min_seq_len = 128", "min_seq_len = 1"),
        ("memory.toml", "\nhead = ", "\nheda = "),
        ("memory.toml", "heads = 14\n", "heads = 13\n"),
    ]);
    let share = line_of("memory.toml", "estimate_share = 0.85");
    let seq = line_of("memory.toml", "min_seq_len = 128");
    let head = std::fs::read_to_string(tables_dir().join("memory.toml"))
        .unwrap()
        .lines()
        .position(|l| l.starts_with("head = "))
        .unwrap()
        + 1;
    // The shape's error points at its `[[reference_shape]]` header.
    let shape = line_of("memory.toml", "source = \"Qwen/Qwen2-0.5B\"") - 1;
    let coefficients = line_of("memory.toml", "[coefficients]");
    assert_eq!(
        errs,
        [
            format!(
                "tables/memory.toml:{head}:8: unknown key \"heda\" in [coefficients] (known: runtime_mib, load_tensor, adapters, logits_forward, logits_backward, head, block_hidden, block_intermediate, block_attention, checkpoint_hidden, backward_hidden, backward_intermediate, backward_attention)"
            ),
            format!("tables/memory.toml:{coefficients}:1: [coefficients] lacks \"head\""),
            format!(
                "tables/memory.toml:{share}:18: estimate_share is 0, must be a number in (0, 1]"
            ),
            format!(
                "tables/memory.toml:{seq}:15: min_seq_len is 1, must be an integer in 2..=1048576"
            ),
            format!(
                "tables/memory.toml:{shape}:1: heads must divide hidden into an even head width, and kv_heads must divide heads"
            ),
        ]
    );
}

#[test]
fn size_patterns_must_fit_the_detectors_table() {
    // A context length spelled with 300 exact letters: one state per letter.
    let errors = errors(&[(
        "detect.toml",
        "regex = '(?:1|2|4|8|16|20|32|40|64|80|100|128|160|200|256|512|1000|1024)k(?:[^a-z]|$)'",
        "regex = '[0-9]+k(?:[a-c]{300})?(?:[^a-z]|$)'",
    )]);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0]
            .starts_with("tables/detect.toml: cannot build the size DFA: the patterns compile to ")
            && errors[0].contains("at most 256 states"),
        "{errors:?}"
    );
}

#[test]
fn known_architecture_errors_all_reported_at_once() {
    let errs = errors(&[
        (
            "known_models.toml",
            "names = [\"qwen2.5-72b\"]",
            "names = [\"qwen2.5-32b\"]",
        ),
        (
            "known_models.toml",
            "heads = 15\nkv_heads = 5",
            "heads = 14\nkv_heads = 5",
        ),
        ("known_models.toml", "vocab = 100352", "vocab = 0"),
        (
            "known_models.toml",
            "id = \"google/gemma-2-27b\"",
            "id = \"google/gemma-2-9b\"",
        ),
        (
            "known_models.toml",
            "\"instruct\", \"it\",",
            "\"instruct\", \"-it\",",
        ),
    ]);
    let first_32b = line_of("known_models.toml", "names = [\"qwen2.5-32b\"]");
    let dup_32b = line_of("known_models.toml", "names = [\"qwen2.5-72b\"]");
    let smol = line_of("known_models.toml", "names = [\"smollm2-360m\"]");
    let phi4 = line_of("known_models.toml", "vocab = 100352");
    let gemma9 = line_of("known_models.toml", "id = \"google/gemma-2-9b\"");
    let gemma27 = line_of("known_models.toml", "id = \"google/gemma-2-27b\"");
    let suffixes = line_of(
        "known_models.toml",
        "    \"instruct\", \"it\", \"chat\", \"base\", \"pt\", \"hf\",",
    );
    assert_eq!(
        errs,
        [
            format!(
                "tables/known_models.toml:{suffixes}:17: suffix \"-it\" must be one word of lower-case ASCII letters, digits and '.'"
            ),
            format!(
                "tables/known_models.toml:{dup_32b}:10: duplicate architecture name \"qwen2.5-32b\" (first at {first_32b}:10)"
            ),
            format!(
                "tables/known_models.toml:{gemma27}:6: duplicate architecture id \"google/gemma-2-9b\" (first at {gemma9}:6)"
            ),
            format!("tables/known_models.toml:{phi4}:9: vocab is 0, must be in 1..=16777216"),
            format!(
                "tables/known_models.toml:{}:9: heads 14 does not divide hidden 960: write head_dim",
                smol + 4
            ),
            format!(
                "tables/known_models.toml:{}:12: kv_heads 5 does not divide heads 14",
                smol + 5
            ),
        ]
    );
    // Every field but head_dim and qkv_bias must be written.
    let e = errors(&[("known_models.toml", "intermediate = 3072\n", "")]);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].contains("missing field `intermediate`"), "{e:?}");
}

#[test]
fn a_flag_of_the_trainer_table_takes_only_true_or_false() {
    // `quantize_embeddings` is a flag: a number there, or a number's key
    // given a flag, is named with its place and what it must be.
    let line = |key: &str| {
        let text = std::fs::read_to_string(tables_dir().join("defaults.toml")).unwrap();
        1 + text.lines().position(|l| l.starts_with(key)).unwrap()
    };
    let errors = errors(&[
        (
            "defaults.toml",
            "quantize_embeddings = false",
            "quantize_embeddings = 1",
        ),
        ("defaults.toml", "\nseed = 42", "\nseed = true"),
    ]);
    assert_eq!(
        errors,
        [
            format!(
                "tables/defaults.toml:{}:8: seed is true, must be an integer in 0..=4294967295",
                line("seed = ")
            ),
            format!(
                "tables/defaults.toml:{}:23: quantize_embeddings is 1, must be true or false",
                line("quantize_embeddings = ")
            ),
        ]
    );
}
