//! Models whose published architecture `tables/known_models.toml` holds,
//! found by name: what the memory model sizes a model by when only its name
//! is given.

use crate::detect::{ModelName, model_segment};
use crate::tables::{KNOWN_ARCHITECTURES, KnownArchitecture, SHAPE_SUFFIXES};

/// Whether `b` separates the words of a name.
fn is_separator(b: u8) -> bool {
    b == b'-' || b == b'_'
}

/// Whether `rest` (what follows a matched name) is nothing, or only words
/// of `[shape_match] suffixes`, each after a separator.
fn only_suffixes(rest: &[u8]) -> bool {
    let Some((&first, words)) = rest.split_first() else {
        return true;
    };
    is_separator(first)
        && words.split(|&b| is_separator(b)).all(|w| {
            SHAPE_SUFFIXES
                .iter()
                .any(|s| w.eq_ignore_ascii_case(s.as_bytes()))
        })
}

/// Whether `key` occurs in `segment` at its start or after a separator,
/// followed by nothing but suffixes (ASCII case-insensitive).
fn matches(segment: &[u8], key: &[u8]) -> bool {
    if key.is_empty() || key.len() > segment.len() {
        return false;
    }
    (0..=segment.len() - key.len()).any(|i| {
        (i == 0 || is_separator(segment[i - 1]))
            && segment[i..i + key.len()].eq_ignore_ascii_case(key)
            && only_suffixes(&segment[i + key.len()..])
    })
}

/// The published architecture of the model `name` names, when the table
/// knows it: one of a row's names occurs in the name's model component (see
/// [`model_segment`]) at its start or after `-`/`_` (an org prefix such as
/// `Meta-`), followed by nothing or only suffix words (`-Instruct`, `-it`,
/// `-bnb-4bit`). The longest matching name wins; the first row on a tie.
///
/// ```
/// use qlora_scale::memory::known_architecture;
/// let a = known_architecture("unsloth/Qwen2.5-14B-Instruct-bnb-4bit").unwrap();
/// assert_eq!((a.shape.layers, a.shape.kv_heads, a.shape.vocab), (48, 8, 152064));
/// assert_eq!(known_architecture("meta-llama/Meta-Llama-3.1-8B-Instruct").unwrap().id,
///            "meta-llama/Llama-3.1-8B");
/// // Phi-4-mini is another model than Phi-4: no suffix word "mini".
/// assert!(known_architecture("microsoft/Phi-4-mini-instruct").is_none());
/// ```
pub fn known_architecture(name: &(impl ModelName + ?Sized)) -> Option<&'static KnownArchitecture> {
    let segment = model_segment(name.name_bytes());
    let mut best: Option<(usize, &'static KnownArchitecture)> = None;
    for row in &KNOWN_ARCHITECTURES {
        for key in row.names {
            let longer = best.is_none_or(|(len, _)| key.len() > len);
            if longer && matches(segment, key.as_bytes()) {
                best = Some((key.len(), row));
            }
        }
    }
    best.map(|(_, row)| row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_matches_with_prefixes_and_suffixes_only() {
        let id = |n: &str| known_architecture(n).map(|a| a.id);
        assert_eq!(id("Qwen/Qwen2.5-14B-Instruct"), Some("Qwen/Qwen2.5-14B"));
        assert_eq!(id("qwen2.5-14b"), Some("Qwen/Qwen2.5-14B"));
        assert_eq!(id("google/gemma-2-9b-it"), Some("google/gemma-2-9b"));
        assert_eq!(
            id("/hf/models--google--gemma-3-1b-it/snapshots/0123456789abcdef0123/"),
            Some("google/gemma-3-1b-pt")
        );
        assert_eq!(
            id("mistralai/Mistral-Nemo-Instruct-2407"),
            Some("mistralai/Mistral-Nemo-Base-2407")
        );
        // Another size, another model, a word that is not a suffix.
        assert_eq!(id("Qwen/Qwen2.5-3B"), Some("Qwen/Qwen2.5-3B"));
        assert_eq!(id("Qwen/Qwen2.5-32B"), Some("Qwen/Qwen2.5-32B"));
        assert_eq!(id("Qwen/Qwen2.5-Coder-7B"), None);
        assert_eq!(id("Qwen2.5-14B-my-finetune"), None);
        assert_eq!(id("xqwen2.5-14b"), None);
        assert_eq!(id("Qwen2.5-14B--Instruct"), None);
        assert_eq!(id(""), None);
    }

    #[test]
    fn the_longest_name_wins() {
        // "llama-3.1-8b" would not match this name, but the distill's name
        // is the longer one anyway.
        let a = known_architecture("deepseek-ai/DeepSeek-R1-Distill-Llama-8B").unwrap();
        assert_eq!(a.id, "deepseek-ai/DeepSeek-R1-Distill-Llama-8B");
    }
}
