//! `tables/memory.toml`: the `[coefficients]` and `[fit]` values of
//! [`super::SETTINGS`], and the reference architectures.

use super::super::model::MemoryFile;
use super::checker::FileChecker;
use super::{RefShape, Setting, check_settings};

/// `[coefficients]` and `[fit]` against [`super::SETTINGS`], appended to
/// `out`.
pub(super) fn settings(
    f: &mut FileChecker,
    t: &MemoryFile,
    out: &mut Vec<(&'static Setting, f64)>,
) {
    check_settings(f, "coefficients", &t.coefficients, out);
    check_settings(f, "fit", &t.fit, out);
}

/// `[[reference_shape]]`: at least one; every size positive; heads divide
/// the width into an even head width and KV heads divide the heads.
pub(super) fn reference_shapes(f: &mut FileChecker, t: &MemoryFile) -> Vec<RefShape> {
    if t.reference_shape.is_empty() {
        f.err(
            0..0,
            "no [[reference_shape]]: the memory model needs at least one",
        );
    }
    let mut out = Vec::new();
    for s in &t.reference_shape {
        let r = s.get_ref();
        let mut dim =
            |v: &toml::Spanned<i64>, what: &str| -> u64 { u64::from(f.int(v, what, 1, 1 << 24)) };
        let shape = RefShape {
            source: r.source.get_ref().clone(),
            layers: dim(&r.layers, "layers"),
            hidden: dim(&r.hidden, "hidden"),
            intermediate: dim(&r.intermediate, "intermediate"),
            heads: dim(&r.heads, "heads"),
            kv_heads: dim(&r.kv_heads, "kv_heads"),
            vocab: dim(&r.vocab, "vocab"),
            tied: *r.tied.get_ref(),
        };
        if r.source.get_ref().trim().is_empty() {
            f.err(
                r.source.span(),
                "source is empty: name the model the shape is from",
            );
        }
        if shape.heads == 0
            || shape.kv_heads == 0
            || !shape.hidden.is_multiple_of(shape.heads)
            || !shape.heads.is_multiple_of(shape.kv_heads)
            || !(shape.hidden / shape.heads.max(1)).is_multiple_of(2)
        {
            f.err(
                s.span(),
                "heads must divide hidden into an even head width, and kv_heads must divide heads",
            );
        }
        out.push(shape);
    }
    out
}
