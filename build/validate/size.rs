//! `tables/size.toml`: tiers, limits, categories and scaling.

use toml::Spanned;

use super::super::model::{self, SizeFile};
use super::checker::{FileChecker, Seen};
use super::{BILLION, Category, Limits};

/// What `size.toml` contributes to [`super::Tables`].
pub(super) struct Size {
    pub tiers: Vec<String>,
    pub default_tier: usize,
    pub limits: Limits,
    pub categories: Vec<Category>,
    pub batch_size_cap: u32,
    pub default_batch_size: u32,
}

pub(super) fn check(f: &mut FileChecker, t: &SizeFile) -> Size {
    let mut seen = Seen::new("tier");
    let mut tiers = Vec::new();
    for tier in &t.tiers.get_ref().order {
        f.unique_identifier(&mut seen, tier, "tier name");
        tiers.push(tier.get_ref().clone());
    }
    if tiers.is_empty() {
        f.err(t.tiers.span(), "tiers.order lists no tier");
    }
    let default_tier = f.lookup(&tiers, &t.tiers.get_ref().default, "tier");
    let limits = limits(f, t.limits.get_ref());
    let categories = categories(f, t, &tiers, &limits);
    let s = t.scaling.get_ref();
    let batch_size_cap = f.int(&s.batch_size_cap, "batch_size_cap", 1, 1 << 20);
    let default_batch_size = f.int(&s.default_batch_size, "default_batch_size", 1, 1 << 20);
    Size {
        tiers,
        default_tier,
        limits,
        categories,
        batch_size_cap,
        default_batch_size,
    }
}

/// `[limits]`: each bound in range, minimums not above maximums.
fn limits(f: &mut FileChecker, l: &model::Limits) -> Limits {
    let rank_min = f.int(&l.lora_rank_min, "lora_rank_min", 1, 1 << 16);
    let rank_max = f.int(&l.lora_rank_max, "lora_rank_max", 1, 1 << 16);
    let rank_mult = f.int(
        &l.lora_rank_multiple_of,
        "lora_rank_multiple_of",
        1,
        1 << 16,
    );
    let layers_min = f.int(&l.lora_num_layers_min, "lora_num_layers_min", 1, 1 << 16);
    let layers_max = f.int(&l.lora_num_layers_max, "lora_num_layers_max", 1, 1 << 16);
    let mult_max = *l.batch_size_multiplier_max.get_ref();
    if !(mult_max.is_finite() && mult_max > 0.0) {
        f.err(
            l.batch_size_multiplier_max.span(),
            format!("batch_size_multiplier_max is {mult_max}, must be a positive number"),
        );
    }
    if rank_min > rank_max {
        f.err(
            l.lora_rank_min.span(),
            format!("lora_rank_min {rank_min} is above lora_rank_max {rank_max}"),
        );
    }
    if layers_min > layers_max {
        f.err(
            l.lora_num_layers_min.span(),
            format!("lora_num_layers_min {layers_min} is above lora_num_layers_max {layers_max}"),
        );
    }
    Limits {
        lora_rank_min: rank_min,
        lora_rank_max: rank_max,
        lora_rank_multiple_of: rank_mult,
        lora_num_layers_min: layers_min,
        lora_num_layers_max: layers_max,
        batch_size_multiplier_max: mult_max,
    }
}

/// `[[category]]`: at least one; unique identifier names; ascending
/// thresholds, none on the last; rank and layers within the limits and
/// strictly increasing with size.
fn categories(
    f: &mut FileChecker,
    t: &SizeFile,
    tiers: &[String],
    limits: &Limits,
) -> Vec<Category> {
    let mut categories: Vec<Category> = Vec::new();
    let mut seen = Seen::new("category");
    let n = t.category.len();
    if n == 0 {
        f.err(0..0, "no [[category]] is defined");
    }
    for (i, cat) in t.category.iter().enumerate() {
        let r = cat.get_ref();
        f.unique_identifier(&mut seen, &r.name, "category name");
        let max_params = max_params(f, cat, i + 1 == n, categories.last());
        let rank = rank_in_limits(f, &r.lora_rank, limits);
        let layers = layers_in_limits(f, &r.lora_num_layers, limits);
        let m = *r.batch_size_multiplier.get_ref();
        let mult_max = limits.batch_size_multiplier_max;
        if !(m > 0.0 && m <= mult_max) {
            f.err(
                r.batch_size_multiplier.span(),
                format!("batch_size_multiplier is {m}, must be in (0, {mult_max}]"),
            );
        }
        if let Some(prev) = categories.last() {
            if rank <= prev.lora_rank {
                f.err(
                    r.lora_rank.span(),
                    format!(
                        "lora_rank {rank} of \"{}\" must be above {} of \"{}\" (ranks strictly increase with size)",
                        r.name.get_ref(),
                        prev.lora_rank,
                        prev.name
                    ),
                );
            }
            if layers <= prev.lora_num_layers {
                f.err(
                    r.lora_num_layers.span(),
                    format!(
                        "lora_num_layers {layers} of \"{}\" must be above {} of \"{}\" (layers strictly increase with size)",
                        r.name.get_ref(),
                        prev.lora_num_layers,
                        prev.name
                    ),
                );
            }
        }
        let tier = f.lookup(tiers, &r.tier, "tier");
        categories.push(Category {
            name: r.name.get_ref().clone(),
            max_params,
            max_params_b: r.max_params_b.as_ref().map(|m| *m.get_ref()),
            lora_rank: rank,
            lora_num_layers: layers,
            batch_size_multiplier: m,
            tier,
        });
    }
    categories
}

/// A category's upper bound in parameters: set on every category but the
/// last, above the previous one's.
fn max_params(
    f: &mut FileChecker,
    cat: &Spanned<model::Category>,
    last: bool,
    prev: Option<&Category>,
) -> Option<u64> {
    let r = cat.get_ref();
    match (&r.max_params_b, last) {
        (Some(m), false) => {
            let v = f.int(m, "max_params_b", 0, 1_000_000);
            if let Some(prev) = prev
                .and_then(|p| p.max_params_b)
                .filter(|&prev| *m.get_ref() <= prev)
            {
                f.err(
                    m.span(),
                    format!(
                        "max_params_b {} of \"{}\" must be above the previous category's {prev} (thresholds ascend)",
                        m.get_ref(),
                        r.name.get_ref()
                    ),
                );
            }
            Some(u64::from(v) * BILLION)
        }
        (None, false) => {
            f.err(
                cat.span(),
                format!("category \"{}\" needs max_params_b (only the last category has no upper bound)", r.name.get_ref()),
            );
            None
        }
        (Some(m), true) => {
            f.err(
                m.span(),
                format!("the last category \"{}\" takes every larger size and must not set max_params_b", r.name.get_ref()),
            );
            None
        }
        (None, true) => None,
    }
}

/// A `lora_rank` (of a category or a hardware profile) within the limits and
/// a multiple of `lora_rank_multiple_of`.
pub(super) fn rank_in_limits(f: &mut FileChecker, v: &Spanned<i64>, l: &Limits) -> u32 {
    let rank = f.int(
        v,
        "lora_rank",
        i64::from(l.lora_rank_min),
        i64::from(l.lora_rank_max),
    );
    if l.lora_rank_multiple_of > 0 && !rank.is_multiple_of(l.lora_rank_multiple_of) {
        f.err(
            v.span(),
            format!(
                "lora_rank {rank} must be a multiple of {}",
                l.lora_rank_multiple_of
            ),
        );
    }
    rank
}

/// A `lora_num_layers` (of a category or a hardware profile) within the
/// limits.
pub(super) fn layers_in_limits(f: &mut FileChecker, v: &Spanned<i64>, l: &Limits) -> u32 {
    f.int(
        v,
        "lora_num_layers",
        i64::from(l.lora_num_layers_min),
        i64::from(l.lora_num_layers_max),
    )
}
