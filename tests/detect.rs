//! Detection beyond the seed's cases: decimals, unit suffixes, tokens that are
//! not sizes, paths and raw bytes, and adversarial input.

use std::ffi::OsStr;
use std::path::Path;

use qlora_scale::detect::{format_params_billions, last_segment, matchers_ok};
use qlora_scale::{SizeCategory, SizeSource, detect_model_size};

fn params(name: &str) -> u64 {
    detect_model_size(name).params
}

#[test]
fn embedded_dfas_load() {
    assert!(
        matchers_ok(),
        "the DFAs embedded by build.rs must deserialise"
    );
}

#[test]
fn decimals() {
    assert_eq!(params("Qwen/Qwen2.5-0.5B-Instruct"), 500_000_000);
    assert_eq!(params("Qwen/Qwen2.5-1.5B"), 1_500_000_000);
    assert_eq!(params("HuggingFaceTB/SmolLM2-1.7B"), 1_700_000_000);
    assert_eq!(params("org/model-2.75b"), 2_750_000_000);
}

#[test]
fn unit_suffixes() {
    assert_eq!(params("HuggingFaceTB/SmolLM2-135M"), 135_000_000);
    assert_eq!(params("HuggingFaceTB/SmolLM2-360M-Instruct"), 360_000_000);
    assert_eq!(params("EleutherAI/pythia-70m"), 70_000_000);
    assert_eq!(params("org/model-1T"), 1_000_000_000_000);
    assert_eq!(
        detect_model_size("org/model-1T").category,
        SizeCategory::Xlarge
    );
    assert_eq!(params("org/tiny-300k"), 300_000);
}

#[test]
fn quantisation_tags_are_not_sizes() {
    assert_eq!(
        params("mlx-community/Meta-Llama-3-8B-Instruct-4bit"),
        8_000_000_000
    );
    assert_eq!(
        params("TheBloke/Llama-2-13B-chat-GPTQ-8bit"),
        13_000_000_000
    );
    let s = detect_model_size("org/some-model-8bit");
    assert_eq!((s.params, s.source), (0, SizeSource::Unknown));
    assert_eq!(params("org/model-4-bit"), 0);
}

#[test]
fn context_lengths_are_not_sizes() {
    // Not 4 thousand parameters: the known family's 3.82B.
    assert_eq!(params("microsoft/Phi-3-mini-4k-instruct"), 3_820_000_000);
    assert_eq!(params("org/unknown-4k-instruct"), 0);
    assert_eq!(params("01-ai/Yi-34B-200K"), 34_000_000_000);
    assert_eq!(params("org/model-128k-7b"), 7_000_000_000);
}

#[test]
fn sources() {
    assert_eq!(detect_model_size("org/model-7b").source, SizeSource::Name);
    assert_eq!(
        detect_model_size("microsoft/phi-2").source,
        SizeSource::Family
    );
    assert_eq!(
        detect_model_size("org/bert-base").source,
        SizeSource::Unknown
    );
}

#[test]
fn paths_and_separators() {
    assert_eq!(params("C:\\models\\Llama-2-13b-hf\\"), 13_000_000_000);
    assert_eq!(params("/data/models/Llama-2-13b-hf/"), 13_000_000_000);
    assert_eq!(params("///"), 0);
    assert_eq!(last_segment(b"a/b\\c//"), b"c");
    assert_eq!(last_segment(b"plain"), b"plain");
    assert_eq!(last_segment(b""), b"");
    // Only the last component counts.
    assert_eq!(params("/models/70b-collection/phi-2"), 3_000_000_000);
}

#[test]
fn bytes_os_str_and_paths() {
    assert_eq!(
        detect_model_size(&b"\xff\xfe/model-7b"[..]).params,
        7_000_000_000
    );
    assert_eq!(detect_model_size(b"model-\xff-14B").params, 14_000_000_000);
    assert_eq!(
        detect_model_size(OsStr::new("x/Mistral-7B")).params,
        7_000_000_000
    );
    assert_eq!(
        detect_model_size(Path::new("x/Llama-2-70b")).params,
        70_000_000_000
    );
    assert_eq!(
        detect_model_size(&String::from("a/model-3b")).params,
        3_000_000_000
    );
}

#[test]
fn overflow_saturates() {
    let s = detect_model_size("org/model-99999999999999999999999999999b");
    assert_eq!(s.params, u64::MAX);
    assert_eq!(s.category, SizeCategory::Xlarge);
    assert_eq!(
        params("org/model-1.00000000000000000000000000000000001b"),
        1_000_000_000
    );
}

#[test]
fn only_ascii_digits() {
    // Arabic-Indic seven, full-width seven: not digits here.
    assert_eq!(params("org/model-\u{0667}b"), 0);
    assert_eq!(params("org/model-\u{FF17}b"), 0);
}

#[test]
fn adversarial_inputs() {
    let digits = "1".repeat(1 << 20) + "b";
    assert_eq!(detect_model_size(&digits).params, u64::MAX);
    let no_match = "7-".repeat(1 << 19);
    assert_eq!(detect_model_size(&no_match).params, 0);
    let nul = "model\0-7b\0";
    assert_eq!(params(nul), 7_000_000_000);
    let dots = "1.".repeat(1 << 18);
    assert_eq!(params(&dots), 0);
}

#[test]
fn category_follows_params() {
    for (name, cat) in [
        ("x-0.5b", SizeCategory::Small),
        ("x-10.5b", SizeCategory::Medium),
        ("x-20.1b", SizeCategory::Large),
        ("x-50.5b", SizeCategory::Xlarge),
    ] {
        assert_eq!(detect_model_size(name).category, cat, "{name}");
    }
}

#[test]
fn formatting_params() {
    assert_eq!(format_params_billions(7_000_000_000), "7");
    assert_eq!(format_params_billions(500_000_000), "0.5");
    assert_eq!(format_params_billions(46_700_000_000), "46.7");
    assert_eq!(format_params_billions(135_000_000), "0.135");
}

/// Every overriding family is found wherever it sits in a name: at the
/// start, the end, or inside, in any ASCII case (the detector prefilters
/// by the bytes around the size, which these place at every distance from
/// the name's ends). The expected family is the first listed whose prefix
/// ends, and rest starts, where the name's size starts.
#[test]
fn overriding_families_in_any_context() {
    use qlora_scale::tables::OVERRIDE_FAMILIES;
    let before = ["", "a", "-", "ab", "x-y", "org/", "abcde-", "Some-Model-"];
    let after = ["", "-", "_x", "-it", ".gguf", "-instruct-hf"];
    for family in &OVERRIDE_FAMILIES {
        for b in before {
            for a in after {
                let name = format!("{b}{}{}{a}", family.prefix, family.rest);
                let last = name.rsplit('/').next().unwrap_or(&name);
                let at = last.len() - a.len() - family.rest.len();
                let expected = OVERRIDE_FAMILIES
                    .iter()
                    .find(|f| {
                        at >= f.prefix.len()
                            && last[at - f.prefix.len()..at].eq_ignore_ascii_case(f.prefix)
                            && last
                                .get(at..at + f.rest.len())
                                .is_some_and(|r| r.eq_ignore_ascii_case(f.rest))
                    })
                    .map(|f| f.params);
                for n in [name.clone(), name.to_ascii_uppercase()] {
                    let size = detect_model_size(n.as_str());
                    assert_eq!(Some(size.params), expected, "{n}");
                    assert_eq!(size.source, SizeSource::Family, "{n}");
                }
            }
        }
    }
}
