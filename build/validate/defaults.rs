//! `tables/defaults.toml`: `[train]`, and the `[trainer]` and `[embedded]`
//! values of [`super::SETTINGS`].

use super::super::model::DefaultsFile;
use super::checker::FileChecker;
use super::{Setting, check_settings};

/// What `defaults.toml`'s `[train]` contributes to [`super::Tables`].
pub(super) struct Train {
    pub default_model: String,
    pub lora_alpha_per_rank: f64,
}

/// `[train]`: a default model, a positive alpha per rank.
pub(super) fn train(f: &mut FileChecker, t: &DefaultsFile) -> Train {
    let d = t.train.get_ref();
    if d.default_model.get_ref().trim().is_empty() {
        f.err(d.default_model.span(), "default_model is empty");
    }
    let alpha = *d.lora_alpha_per_rank.get_ref();
    if !(alpha > 0.0 && alpha.is_finite()) {
        f.err(
            d.lora_alpha_per_rank.span(),
            format!("lora_alpha_per_rank is {alpha}, must be positive"),
        );
    }
    Train {
        default_model: d.default_model.get_ref().clone(),
        lora_alpha_per_rank: alpha,
    }
}

/// `[trainer]` and `[embedded]` against [`super::SETTINGS`], appended to
/// `out`.
pub(super) fn settings(
    f: &mut FileChecker,
    t: &DefaultsFile,
    out: &mut Vec<(&'static Setting, f64)>,
) {
    check_settings(f, "trainer", &t.trainer, out);
    check_settings(f, "embedded", &t.embedded, out);
}

/// The embedded model's shape, read from `settings`: dimensions multiples of
/// the NF4 block (64) where it quantizes them, heads that divide the width
/// into an even head width, KV heads that divide the heads.
pub(super) fn embedded_shape(
    f: &mut FileChecker,
    t: &DefaultsFile,
    settings: &[(&'static Setting, f64)],
) {
    let get = |name: &str| {
        settings
            .iter()
            .find(|(s, _)| s.section == "embedded" && s.name == name)
            .map_or(0.0, |(_, x)| *x) as u64
    };
    let (hidden, inter, heads, kv) = (
        get("hidden_size"),
        get("intermediate_size"),
        get("num_attention_heads"),
        get("num_key_value_heads"),
    );
    let span = t.embedded.span();
    if hidden % 64 != 0 || inter % 64 != 0 {
        f.err(
            span.clone(),
            "[embedded] hidden_size and intermediate_size must be multiples of 64 (the NF4 block)",
        );
    }
    if heads == 0
        || kv == 0
        || hidden % heads != 0
        || heads % kv != 0
        || (hidden / heads.max(1)) % 2 != 0
    {
        f.err(span, "[embedded] num_attention_heads must divide hidden_size into an even head width, and num_key_value_heads must divide num_attention_heads");
    }
}
