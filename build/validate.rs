//! Every rule a table must satisfy, checked at once, into a clean model.

use std::collections::HashMap;
use std::ops::Range;

use super::diag::{Diagnostic, Source};
use super::model::{self, Loaded, RawProfile};

/// What a detection pattern marks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatternKind {
    /// A parameter count.
    Size,
    /// A token that looks like a size but is not; skipped.
    Ignore,
    /// A mixture of experts: `8x7B`.
    Moe,
}

pub struct FamilyRule {
    /// Lower-case substring.
    pub substring: String,
    pub params: u64,
    /// Beats a size written in the name.
    pub overrides: bool,
    /// Where the substring is written in `tables/known_models.toml`.
    pub span: Range<usize>,
}

pub struct MoeLayout {
    pub experts: u32,
    pub expert_params: u64,
    pub total_params: u64,
}

pub struct Category {
    pub name: String,
    /// Inclusive upper bound in parameters; `None` for the last category.
    pub max_params: Option<u64>,
    pub max_params_b: Option<i64>,
    pub lora_rank: u32,
    pub lora_num_layers: u32,
    pub batch_size_multiplier: f64,
    /// Index into `Tables::tiers`.
    pub tier: usize,
}

pub struct Limits {
    pub lora_rank_min: u32,
    pub lora_rank_max: u32,
    pub lora_rank_multiple_of: u32,
    pub lora_num_layers_min: u32,
    pub lora_num_layers_max: u32,
    pub batch_size_multiplier_max: f64,
}

#[derive(Clone)]
pub struct Profile {
    pub batch_size: u32,
    pub lora_rank: u32,
    pub lora_num_layers: u32,
    pub grad_checkpoint: bool,
    pub tier: usize,
}

pub struct HardwareRow {
    pub variant: usize,
    pub memory_gb: u32,
    pub profile: Profile,
}

/// A `[[gpu.profile]]` or `[[cpu.profile]]` row.
pub struct MemoryRow {
    pub memory_gb: u32,
    pub profile: Profile,
}

/// A `[[cpu.simd]]` feature: its name and the cpuinfo flags that show it.
pub struct SimdFeature {
    pub name: String,
    pub flags: Vec<String>,
}

pub struct Generation {
    pub name: String,
    /// GPU cores per variant, in the order of `Tables::variants`.
    pub gpu_cores: Vec<u32>,
}

pub struct Model {
    pub key: String,
    pub id: String,
    pub inference_gb: u32,
    pub training_gb: u32,
    pub params: String,
    pub tier: usize,
    pub recommended: bool,
    pub warning: Option<String>,
}

/// The type of value a profile key holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// A non-negative integer.
    Count,
    /// A boolean.
    Flag,
    /// A model tier.
    Tier,
}

impl KeyKind {
    /// The name used in `tables/profile.toml`.
    pub fn name(self) -> &'static str {
        match self {
            KeyKind::Count => "count",
            KeyKind::Flag => "flag",
            KeyKind::Tier => "tier",
        }
    }
}

/// One key of a training profile.
pub struct ProfileKey {
    pub name: String,
    pub kind: KeyKind,
    pub required: bool,
    /// A field of the library's `Profile`, read and written by scaling.
    pub in_profile: bool,
    pub doc: String,
}

/// The validated tables.
pub struct Tables {
    pub tiers: Vec<String>,
    pub default_tier: usize,
    pub categories: Vec<Category>,
    pub batch_size_cap: u32,
    pub default_batch_size: u32,
    pub limits: Limits,
    pub patterns: Vec<(PatternKind, String)>,
    /// Parameters per unit, indexed by `letter - b'a'`; 0 where no unit.
    pub units: [u64; 26],
    /// Family rules, in priority order.
    pub families: Vec<FamilyRule>,
    /// (name, parameters, span in `tables/known_models.toml`) of models
    /// known by exact name.
    pub known_models: Vec<(String, u64, Range<usize>)>,
    pub moe: Vec<MoeLayout>,
    pub skip_segments: Vec<String>,
    pub hash_min_len: u32,
    /// Files sources differing by more than this fraction disagree.
    pub disagreement_fraction: f64,
    pub cache_prefix: String,
    pub cache_separator: String,
    pub budget_fraction: f64,
    pub variants: Vec<String>,
    pub variant_detect_order: Vec<usize>,
    pub default_variant: usize,
    pub generations: Vec<Generation>,
    /// Memory options per variant.
    pub memory_options: Vec<Vec<u32>>,
    /// (min GPU cores, min batch size).
    pub gpu_core_batch_floors: Vec<(u32, u32)>,
    pub fallback_profile: Profile,
    pub profiles: Vec<HardwareRow>,
    /// `[gpu] budget_fraction`.
    pub gpu_budget_fraction: f64,
    /// `[[gpu.profile]]`, smallest memory first.
    pub gpu_rows: Vec<MemoryRow>,
    /// `[cpu] budget_fraction`.
    pub cpu_budget_fraction: f64,
    /// `[[cpu.profile]]`, smallest memory first.
    pub cpu_rows: Vec<MemoryRow>,
    /// `[[cpu.simd]]`, in table order.
    pub simd: Vec<SimdFeature>,
    pub tight_below_gb: u32,
    pub comfortable_below_gb: u32,
    pub tight_advice: String,
    pub models: Vec<Model>,
    pub default_model: String,
    pub lora_alpha_per_rank: f64,
    /// `[trainer]` and `[embedded]` values, in [`SETTINGS`] order.
    pub settings: Vec<(&'static Setting, f64)>,
    /// Profile keys, in table order.
    pub profile_keys: Vec<ProfileKey>,
    /// `memory.toml`'s `[[reference_shape]]`s, in table order.
    pub reference_shapes: Vec<RefShape>,
}

/// A validated `[[reference_shape]]`.
#[derive(Clone, Debug)]
pub struct RefShape {
    pub source: String,
    pub layers: u64,
    pub hidden: u64,
    pub intermediate: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub vocab: u64,
    pub tied: bool,
}

const BILLION: u64 = 1_000_000_000;

struct Checker<'a> {
    sources: &'a [Source],
    errors: Vec<Diagnostic>,
}

impl Checker<'_> {
    fn err(&mut self, file: usize, span: Range<usize>, msg: impl Into<String>) {
        self.errors.push(self.sources[file].error(span, msg));
    }

    /// An integer that must lie in `lo..=hi`.
    fn int(&mut self, file: usize, v: &toml::Spanned<i64>, what: &str, lo: i64, hi: i64) -> u32 {
        let x = *v.get_ref();
        if x < lo || x > hi {
            self.err(
                file,
                v.span(),
                format!("{what} is {x}, must be in {lo}..={hi}"),
            );
            // The value as given (clamped to u32), so later rules judge it
            // as written instead of reporting a cascade of follow-on errors.
            return x.clamp(0, i64::from(u32::MAX)) as u32;
        }
        x as u32
    }

    fn identifier(&mut self, file: usize, v: &toml::Spanned<String>, what: &str) {
        let s = v.get_ref();
        let ok = s.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !ok {
            self.err(
                file,
                v.span(),
                format!("{what} \"{s}\" must be lower-case ASCII letters, digits and '_', starting with a letter"),
            );
        }
    }

    /// Records `name`; reports it when already seen.
    fn unique(
        &mut self,
        file: usize,
        seen: &mut HashMap<String, Range<usize>>,
        key: String,
        span: Range<usize>,
        what: &str,
    ) {
        if let Some(first) = seen.get(&key) {
            let at = self.sources[file].at(first);
            self.err(
                file,
                span,
                format!("duplicate {what} \"{key}\" (first at {at})"),
            );
        } else {
            seen.insert(key, span);
        }
    }

    fn lookup(
        &mut self,
        file: usize,
        names: &[String],
        v: &toml::Spanned<String>,
        what: &str,
    ) -> usize {
        match names.iter().position(|n| n == v.get_ref()) {
            Some(i) => i,
            None => {
                self.err(
                    file,
                    v.span(),
                    format!(
                        "unknown {what} \"{}\" (known: {})",
                        v.get_ref(),
                        names.join(", ")
                    ),
                );
                0
            }
        }
    }
}

/// Checks every rule; returns the clean model or every problem found.
pub fn validate(t: &Loaded) -> Result<Tables, Vec<Diagnostic>> {
    let mut c = Checker {
        sources: &t.sources,
        errors: Vec::new(),
    };
    use model::{DEFAULTS, DETECT, HARDWARE, MODELS, SIZE};

    // ---- size.toml: tiers, limits, categories, scaling
    let mut seen = HashMap::new();
    let mut tiers = Vec::new();
    for tier in &t.size.tiers.get_ref().order {
        c.identifier(SIZE, tier, "tier name");
        c.unique(SIZE, &mut seen, tier.get_ref().clone(), tier.span(), "tier");
        tiers.push(tier.get_ref().clone());
    }
    if tiers.is_empty() {
        c.err(SIZE, t.size.tiers.span(), "tiers.order lists no tier");
    }
    let default_tier = c.lookup(SIZE, &tiers, &t.size.tiers.get_ref().default, "tier");

    let l = t.size.limits.get_ref();
    let rank_min = c.int(SIZE, &l.lora_rank_min, "lora_rank_min", 1, 1 << 16);
    let rank_max = c.int(SIZE, &l.lora_rank_max, "lora_rank_max", 1, 1 << 16);
    let rank_mult = c.int(
        SIZE,
        &l.lora_rank_multiple_of,
        "lora_rank_multiple_of",
        1,
        1 << 16,
    );
    let layers_min = c.int(
        SIZE,
        &l.lora_num_layers_min,
        "lora_num_layers_min",
        1,
        1 << 16,
    );
    let layers_max = c.int(
        SIZE,
        &l.lora_num_layers_max,
        "lora_num_layers_max",
        1,
        1 << 16,
    );
    let mult_max = *l.batch_size_multiplier_max.get_ref();
    if !(mult_max.is_finite() && mult_max > 0.0) {
        c.err(
            SIZE,
            l.batch_size_multiplier_max.span(),
            format!("batch_size_multiplier_max is {mult_max}, must be a positive number"),
        );
    }
    if rank_min > rank_max {
        c.err(
            SIZE,
            l.lora_rank_min.span(),
            format!("lora_rank_min {rank_min} is above lora_rank_max {rank_max}"),
        );
    }
    if layers_min > layers_max {
        c.err(
            SIZE,
            l.lora_num_layers_min.span(),
            format!("lora_num_layers_min {layers_min} is above lora_num_layers_max {layers_max}"),
        );
    }
    let limits = Limits {
        lora_rank_min: rank_min,
        lora_rank_max: rank_max,
        lora_rank_multiple_of: rank_mult,
        lora_num_layers_min: layers_min,
        lora_num_layers_max: layers_max,
        batch_size_multiplier_max: mult_max,
    };

    let mut categories: Vec<Category> = Vec::new();
    let mut seen = HashMap::new();
    let n = t.size.category.len();
    if n == 0 {
        c.err(SIZE, 0..0, "no [[category]] is defined");
    }
    for (i, cat) in t.size.category.iter().enumerate() {
        let r = cat.get_ref();
        c.identifier(SIZE, &r.name, "category name");
        c.unique(
            SIZE,
            &mut seen,
            r.name.get_ref().clone(),
            r.name.span(),
            "category",
        );
        let last = i + 1 == n;
        let max_params = match (&r.max_params_b, last) {
            (Some(m), false) => {
                let v = c.int(SIZE, m, "max_params_b", 0, 1_000_000);
                if let Some(prev) = categories
                    .last()
                    .and_then(|p| p.max_params_b)
                    .filter(|&prev| *m.get_ref() <= prev)
                {
                    {
                        c.err(
                            SIZE,
                            m.span(),
                            format!(
                                "max_params_b {} of \"{}\" must be above the previous category's {prev} (thresholds ascend)",
                                m.get_ref(),
                                r.name.get_ref()
                            ),
                        );
                    }
                }
                Some(u64::from(v) * BILLION)
            }
            (None, false) => {
                c.err(
                    SIZE,
                    cat.span(),
                    format!("category \"{}\" needs max_params_b (only the last category has no upper bound)", r.name.get_ref()),
                );
                None
            }
            (Some(m), true) => {
                c.err(
                    SIZE,
                    m.span(),
                    format!("the last category \"{}\" takes every larger size and must not set max_params_b", r.name.get_ref()),
                );
                None
            }
            (None, true) => None,
        };
        let rank = rank_in_limits(&mut c, SIZE, &r.lora_rank, &limits);
        let layers = layers_in_limits(&mut c, SIZE, &r.lora_num_layers, &limits);
        let m = *r.batch_size_multiplier.get_ref();
        if !(m > 0.0 && m <= mult_max) {
            c.err(
                SIZE,
                r.batch_size_multiplier.span(),
                format!("batch_size_multiplier is {m}, must be in (0, {mult_max}]"),
            );
        }
        if let Some(prev) = categories.last() {
            if rank <= prev.lora_rank {
                c.err(
                    SIZE,
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
                c.err(
                    SIZE,
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
        let tier = c.lookup(SIZE, &tiers, &r.tier, "tier");
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
    let s = t.size.scaling.get_ref();
    let batch_size_cap = c.int(SIZE, &s.batch_size_cap, "batch_size_cap", 1, 1 << 20);
    let default_batch_size = c.int(
        SIZE,
        &s.default_batch_size,
        "default_batch_size",
        1,
        1 << 20,
    );

    // ---- detect.toml
    let mut patterns = Vec::new();
    let mut any_size = false;
    for p in &t.detect.pattern {
        let r = p.get_ref();
        let kind = match r.kind.get_ref().as_str() {
            "size" => {
                any_size = true;
                PatternKind::Size
            }
            "ignore" => PatternKind::Ignore,
            "moe" => {
                any_size = true;
                PatternKind::Moe
            }
            other => {
                c.err(
                    DETECT,
                    r.kind.span(),
                    format!("unknown pattern kind \"{other}\" (known: size, ignore, moe)"),
                );
                PatternKind::Ignore
            }
        };
        let parsed = regex_syntax::ParserBuilder::new()
            .unicode(false)
            .utf8(false)
            .case_insensitive(true)
            .build()
            .parse(r.regex.get_ref());
        match parsed {
            Ok(hir) => {
                if hir.properties().minimum_len() == Some(0) {
                    c.err(DETECT, r.regex.span(), "pattern can match the empty string");
                } else if !hir
                    .properties()
                    .look_set()
                    .remove(regex_syntax::hir::Look::End)
                    .is_empty()
                {
                    c.err(
                        DETECT,
                        r.regex.span(),
                        "pattern may use no look-around but `$` (the end of the name)",
                    );
                } else if !starts_with_digit(&hir) {
                    c.err(
                        DETECT,
                        r.regex.span(),
                        "pattern must start with an ASCII digit (the DFA is run from the start of each digit run)",
                    );
                }
            }
            Err(e) => {
                let first = e.to_string();
                let last = first.lines().last().unwrap_or("").trim();
                let msg = last.strip_prefix("error: ").unwrap_or(last).to_string();
                c.err(DETECT, r.regex.span(), format!("invalid regex: {msg}"));
            }
        }
        patterns.push((kind, r.regex.get_ref().clone()));
    }
    if !any_size {
        c.err(
            DETECT,
            0..0,
            "no [[pattern]] of kind \"size\": nothing could ever be detected",
        );
    }
    let mut units = [0u64; 26];
    let mut seen = HashMap::new();
    for u in &t.detect.unit {
        let r = u.get_ref();
        let letter = r.letter.get_ref();
        let b = letter.as_bytes();
        if b.len() != 1 || !b[0].is_ascii_alphabetic() {
            c.err(
                DETECT,
                r.letter.span(),
                format!("unit letter \"{letter}\" must be one ASCII letter"),
            );
            continue;
        }
        let lower = b[0].to_ascii_lowercase();
        c.unique(
            DETECT,
            &mut seen,
            (lower as char).to_string(),
            r.letter.span(),
            "unit",
        );
        let params = *r.params.get_ref();
        if params <= 0 {
            c.err(
                DETECT,
                r.params.span(),
                format!("unit params is {params}, must be positive"),
            );
            continue;
        }
        units[usize::from(lower - b'a')] = params as u64;
    }
    let mut moe = Vec::new();
    let mut seen = HashMap::new();
    for m in &t.detect.moe {
        let r = m.get_ref();
        let experts = c.int(DETECT, &r.experts, "experts", 2, 1 << 16);
        let expert_params = billions(&mut c, DETECT, &r.expert_params_b, "expert_params_b");
        let total_params = billions(&mut c, DETECT, &r.total_params_b, "total_params_b");
        c.unique(
            DETECT,
            &mut seen,
            format!("{experts}x{}", r.expert_params_b.get_ref()),
            m.span(),
            "moe layout",
        );
        if total_params > expert_params.saturating_mul(u64::from(experts)) {
            c.err(
                DETECT,
                r.total_params_b.span(),
                format!(
                    "total_params_b {} is above experts x expert_params_b; experts share weights, so the total is at most the product",
                    r.total_params_b.get_ref()
                ),
            );
        }
        moe.push(MoeLayout {
            experts,
            expert_params,
            total_params,
        });
    }
    let path = t.detect.path.get_ref();
    let skip_segments: Vec<String> = path
        .skip_segments
        .iter()
        .map(|s| s.get_ref().clone())
        .collect();
    for s in &path.skip_segments {
        if s.get_ref().is_empty() || s.get_ref().contains(['/', '\\']) {
            c.err(
                DETECT,
                s.span(),
                "skip_segments entries must be non-empty and contain no separator",
            );
        }
    }
    let hash_min_len = c.int(DETECT, &path.hash_min_len, "hash_min_len", 4, 1 << 16);
    let cache_separator = path.cache_separator.get_ref().clone();
    if cache_separator.is_empty() {
        c.err(
            DETECT,
            path.cache_separator.span(),
            "cache_separator is empty",
        );
    }
    let cache_prefix = path.cache_prefix.get_ref().clone();
    if !cache_prefix.ends_with(&cache_separator) {
        c.err(
            DETECT,
            path.cache_prefix.span(),
            format!("cache_prefix \"{cache_prefix}\" must end with cache_separator \"{cache_separator}\""),
        );
    }

    let disagreement = &t.detect.files.get_ref().disagreement_fraction;
    let disagreement_fraction = *disagreement.get_ref();
    if !(disagreement_fraction > 0.0 && disagreement_fraction < 1.0) {
        c.err(
            DETECT,
            disagreement.span(),
            format!("disagreement_fraction is {disagreement_fraction}, must be in (0, 1)"),
        );
    }

    // ---- known_models.toml
    use model::KNOWN;
    let mut known_models = Vec::new();
    let mut seen = HashMap::new();
    for m in &t.known.model {
        let r = m.get_ref();
        let name = r.name.get_ref();
        if name.is_empty() || !name.is_ascii() || name.contains(['/', '\\']) {
            c.err(
                KNOWN,
                r.name.span(),
                format!(
                    "model name \"{name}\" must be a non-empty ASCII name without path separators"
                ),
            );
            continue;
        }
        c.unique(
            KNOWN,
            &mut seen,
            name.to_ascii_lowercase(),
            r.name.span(),
            "model name",
        );
        let params = billions(&mut c, KNOWN, &r.params_b, "params_b");
        known_models.push((name.clone(), params, r.name.span()));
    }
    let mut families: Vec<FamilyRule> = Vec::new();
    let mut family_spans: Vec<Range<usize>> = Vec::new();
    for f in &t.known.family {
        let r = f.get_ref();
        let s = r.substring.get_ref();
        let overrides = r.overrides.as_ref().is_some_and(|o| *o.get_ref());
        if s.is_empty() || !s.is_ascii() {
            c.err(
                KNOWN,
                r.substring.span(),
                format!("family substring \"{s}\" must be non-empty ASCII"),
            );
            continue;
        }
        let lower = s.to_ascii_lowercase();
        // An earlier family shadows this one when every name containing this
        // one contains it too, and it is consulted no later.
        if let Some((i, earlier)) = families
            .iter()
            .enumerate()
            .find(|(_, e)| lower.contains(e.substring.as_str()) && (e.overrides || !overrides))
        {
            let at = t.sources[KNOWN].at(&family_spans[i]);
            let msg = if earlier.substring == lower {
                format!("duplicate family \"{s}\" (first at {at})")
            } else {
                format!(
                    "family \"{s}\" can never match: every name containing it also contains \"{}\" (at {at}), which comes first",
                    earlier.substring
                )
            };
            c.err(KNOWN, r.substring.span(), msg);
            continue;
        }
        let params = billions(&mut c, KNOWN, &r.params_b, "params_b");
        families.push(FamilyRule {
            substring: lower,
            params,
            overrides,
            span: r.substring.span(),
        });
        family_spans.push(r.substring.span());
    }

    // ---- hardware.toml
    let h = &t.hardware;
    let bf = *h.budget_fraction.get_ref();
    if !(bf > 0.0 && bf <= 1.0) {
        c.err(
            HARDWARE,
            h.budget_fraction.span(),
            format!("budget_fraction is {bf}, must be in (0, 1]"),
        );
    }
    let a = h.apple.get_ref();
    let mut variants = Vec::new();
    let mut seen = HashMap::new();
    for v in &a.variants {
        c.identifier(HARDWARE, v, "variant name");
        c.unique(
            HARDWARE,
            &mut seen,
            v.get_ref().clone(),
            v.span(),
            "variant",
        );
        variants.push(v.get_ref().clone());
    }
    let mut variant_detect_order = Vec::new();
    for v in &a.variant_detect_order {
        variant_detect_order.push(c.lookup(HARDWARE, &variants, v, "variant"));
    }
    let default_variant = c.lookup(HARDWARE, &variants, &a.default_variant, "variant");
    let mut generations = Vec::new();
    let mut seen = HashMap::new();
    for g in &a.generation {
        let r = g.get_ref();
        c.identifier(HARDWARE, &r.name, "generation name");
        c.unique(
            HARDWARE,
            &mut seen,
            r.name.get_ref().clone(),
            r.name.span(),
            "generation",
        );
        let cores = r.gpu_cores.get_ref();
        let mut per_variant = Vec::new();
        for v in &variants {
            match cores.get(v) {
                Some(n) => per_variant.push(c.int(HARDWARE, n, "gpu_cores", 1, 100_000)),
                None => {
                    c.err(
                        HARDWARE,
                        r.gpu_cores.span(),
                        format!(
                            "gpu_cores of \"{}\" has no entry for variant \"{v}\"",
                            r.name.get_ref()
                        ),
                    );
                    per_variant.push(0);
                }
            }
        }
        for (k, n) in cores {
            if !variants.contains(k) {
                c.err(
                    HARDWARE,
                    n.span(),
                    format!(
                        "gpu_cores names unknown variant \"{k}\" (known: {})",
                        variants.join(", ")
                    ),
                );
            }
        }
        generations.push(Generation {
            name: r.name.get_ref().clone(),
            gpu_cores: per_variant,
        });
    }
    let mem = a.memory_options_gb.get_ref();
    let mut memory_options = Vec::new();
    for v in &variants {
        match mem.get(v) {
            Some(list) => memory_options.push(
                list.get_ref()
                    .iter()
                    .map(|m| c.int(HARDWARE, m, "memory option", 1, 1 << 20))
                    .collect(),
            ),
            None => {
                c.err(
                    HARDWARE,
                    a.memory_options_gb.span(),
                    format!("memory_options_gb has no entry for variant \"{v}\""),
                );
                memory_options.push(Vec::new());
            }
        }
    }
    for (k, list) in mem {
        if !variants.contains(k) {
            c.err(
                HARDWARE,
                list.span(),
                format!(
                    "memory_options_gb names unknown variant \"{k}\" (known: {})",
                    variants.join(", ")
                ),
            );
        }
    }
    let mut gpu_core_batch_floors = Vec::new();
    for f in &a.gpu_core_batch_floor {
        let r = f.get_ref();
        gpu_core_batch_floors.push((
            c.int(HARDWARE, &r.min_gpu_cores, "min_gpu_cores", 1, 100_000),
            c.int(HARDWARE, &r.min_batch_size, "min_batch_size", 1, 1 << 20),
        ));
    }
    let fb = a.fallback_profile.get_ref();
    if let Some(v) = &fb.variant {
        c.err(
            HARDWARE,
            v.span(),
            "the fallback profile applies to every variant and must not name one",
        );
    }
    if let Some(m) = &fb.memory_gb {
        c.err(
            HARDWARE,
            m.span(),
            "the fallback profile applies to every memory size and must not name one",
        );
    }
    let fallback_profile = profile(&mut c, fb, &tiers, &limits);
    let mut profiles = Vec::new();
    let mut seen = HashMap::new();
    for p in &a.profile {
        let r = p.get_ref();
        let (Some(v), Some(m)) = (&r.variant, &r.memory_gb) else {
            c.err(
                HARDWARE,
                p.span(),
                "a hardware profile needs both variant and memory_gb",
            );
            continue;
        };
        let variant = c.lookup(HARDWARE, &variants, v, "variant");
        let memory_gb = c.int(HARDWARE, m, "memory_gb", 1, 1 << 20);
        c.unique(
            HARDWARE,
            &mut seen,
            format!("{} {}", v.get_ref(), m.get_ref()),
            p.span(),
            "profile for (variant, memory_gb)",
        );
        profiles.push(HardwareRow {
            variant,
            memory_gb,
            profile: profile(&mut c, r, &tiers, &limits),
        });
    }
    for (i, v) in variants.iter().enumerate() {
        if !profiles.iter().any(|p| p.variant == i) {
            c.err(
                HARDWARE,
                a.variants[i].span(),
                format!("variant \"{v}\" has no [[apple.profile]] row"),
            );
        }
    }

    let gpu = h.gpu.get_ref();
    let gpu_budget_fraction = fraction(&mut c, &gpu.budget_fraction, "gpu");
    let gpu_rows = memory_rows(&mut c, "gpu", h.gpu.span(), &gpu.profile, &tiers, &limits);
    let cpu = h.cpu.get_ref();
    let cpu_budget_fraction = fraction(&mut c, &cpu.budget_fraction, "cpu");
    let cpu_rows = memory_rows(&mut c, "cpu", h.cpu.span(), &cpu.profile, &tiers, &limits);
    let simd = simd_features(&mut c, &cpu.simd);

    // ---- models.toml
    let fit = t.models.fit.get_ref();
    let tight_below_gb = c.int(MODELS, &fit.tight_below_gb, "tight_below_gb", 0, 1 << 20);
    let comfortable_below_gb = c.int(
        MODELS,
        &fit.comfortable_below_gb,
        "comfortable_below_gb",
        0,
        1 << 20,
    );
    if tight_below_gb > comfortable_below_gb {
        c.err(
            MODELS,
            fit.tight_below_gb.span(),
            format!("tight_below_gb {tight_below_gb} is above comfortable_below_gb {comfortable_below_gb}"),
        );
    }
    let mut models = Vec::new();
    let mut seen_keys = HashMap::new();
    let mut seen_ids = HashMap::new();
    for m in &t.models.model {
        let r = m.get_ref();
        c.unique(
            MODELS,
            &mut seen_keys,
            r.key.get_ref().to_ascii_lowercase(),
            r.key.span(),
            "model key",
        );
        c.unique(
            MODELS,
            &mut seen_ids,
            r.id.get_ref().to_ascii_lowercase(),
            r.id.span(),
            "model id",
        );
        models.push(Model {
            key: r.key.get_ref().clone(),
            id: r.id.get_ref().clone(),
            inference_gb: c.int(MODELS, &r.inference_gb, "inference_gb", 0, 1 << 24),
            training_gb: c.int(MODELS, &r.training_gb, "training_gb", 0, 1 << 24),
            params: r.params.get_ref().clone(),
            tier: c.lookup(MODELS, &tiers, &r.tier, "tier"),
            recommended: *r.recommended.get_ref(),
            warning: r.warning.as_ref().map(|w| w.get_ref().clone()),
        });
    }

    // ---- defaults.toml
    let d = t.defaults.train.get_ref();
    if d.default_model.get_ref().trim().is_empty() {
        c.err(DEFAULTS, d.default_model.span(), "default_model is empty");
    }
    let alpha = *d.lora_alpha_per_rank.get_ref();
    if !(alpha > 0.0 && alpha.is_finite()) {
        c.err(
            DEFAULTS,
            d.lora_alpha_per_rank.span(),
            format!("lora_alpha_per_rank is {alpha}, must be positive"),
        );
    }

    let settings = settings(&mut c, t);
    let profile_keys = profile_keys(&mut c, t);
    let reference_shapes = reference_shapes(&mut c, t);

    if !c.errors.is_empty() {
        return Err(c.errors);
    }
    Ok(Tables {
        tiers,
        default_tier,
        categories,
        batch_size_cap,
        default_batch_size,
        limits,
        patterns,
        units,
        families,
        known_models,
        moe,
        skip_segments,
        hash_min_len,
        disagreement_fraction,
        cache_prefix,
        cache_separator,
        budget_fraction: bf,
        variants,
        variant_detect_order,
        default_variant,
        generations,
        memory_options,
        gpu_core_batch_floors,
        fallback_profile,
        profiles,
        gpu_budget_fraction,
        gpu_rows,
        cpu_budget_fraction,
        cpu_rows,
        simd,
        tight_below_gb,
        comfortable_below_gb,
        tight_advice: fit.tight_advice.get_ref().clone(),
        models,
        default_model: d.default_model.get_ref().clone(),
        lora_alpha_per_rank: alpha,
        settings,
        profile_keys,
        reference_shapes,
    })
}

/// The type of a `[trainer]`/`[embedded]` value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SettingKind {
    /// A real number in `lo..=hi`, or `lo < x <= hi` when `open_low`.
    Float { lo: f64, hi: f64, open_low: bool },
    /// An integer in `lo..=hi`.
    Int { lo: u64, hi: u64 },
}

/// One value of `defaults.toml`'s `[trainer]` or `[embedded]` tables: the
/// table holds the number, this schema its section, name, range and doc.
#[derive(Debug)]
pub struct Setting {
    /// `trainer` or `embedded` (the generated module's name too).
    pub section: &'static str,
    /// The key (the constant is its upper-case form).
    pub name: &'static str,
    /// Type and range.
    pub kind: SettingKind,
    /// The constant's doc.
    pub doc: &'static str,
}

const fn float(
    section: &'static str,
    name: &'static str,
    lo: f64,
    hi: f64,
    open_low: bool,
    doc: &'static str,
) -> Setting {
    Setting {
        section,
        name,
        kind: SettingKind::Float { lo, hi, open_low },
        doc,
    }
}

const fn int(
    section: &'static str,
    name: &'static str,
    lo: u64,
    hi: u64,
    doc: &'static str,
) -> Setting {
    Setting {
        section,
        name,
        kind: SettingKind::Int { lo, hi },
        doc,
    }
}

const MAX_STEPS: u64 = 1 << 40;
const MAX_DIM: u64 = 1 << 20;

/// Every value `[trainer]` and `[embedded]` must hold.
pub static SETTINGS: &[Setting] = &[
    float(
        "trainer",
        "learning_rate",
        0.0,
        1.0,
        true,
        "Peak learning rate.",
    ),
    float(
        "trainer",
        "min_lr_ratio",
        0.0,
        1.0,
        false,
        "The cosine schedule decays to this fraction of the peak.",
    ),
    int(
        "trainer",
        "warmup_steps",
        0,
        MAX_STEPS,
        "Linear warmup, optimizer steps.",
    ),
    int(
        "trainer",
        "max_steps",
        1,
        MAX_STEPS,
        "Optimizer steps of a run on a real model.",
    ),
    int(
        "trainer",
        "grad_accum_steps",
        1,
        1 << 16,
        "Micro-batches accumulated per optimizer step.",
    ),
    float(
        "trainer",
        "grad_clip",
        0.0,
        1e9,
        true,
        "Global gradient-norm clip.",
    ),
    float(
        "trainer",
        "weight_decay",
        0.0,
        1.0,
        false,
        "AdamW decoupled weight decay.",
    ),
    float(
        "trainer",
        "adam_beta1",
        0.0,
        1.0,
        false,
        "AdamW first-moment decay.",
    ),
    float(
        "trainer",
        "adam_beta2",
        0.0,
        1.0,
        false,
        "AdamW second-moment decay.",
    ),
    float(
        "trainer",
        "adam_eps",
        0.0,
        1.0,
        true,
        "AdamW denominator epsilon.",
    ),
    float(
        "trainer",
        "lora_dropout",
        0.0,
        0.99,
        false,
        "Dropout on the LoRA path's input, in training.",
    ),
    int("trainer", "seed", 0, u32::MAX as u64, "The run's one seed."),
    int(
        "trainer",
        "seq_len",
        2,
        1 << 20,
        "Longest training sequence, tokens.",
    ),
    int(
        "trainer",
        "eval_every",
        1,
        MAX_STEPS,
        "Validation loss every this many optimizer steps.",
    ),
    int(
        "trainer",
        "eval_batches",
        1,
        1 << 20,
        "Validation batches per evaluation.",
    ),
    int(
        "trainer",
        "checkpoint_every",
        1,
        MAX_STEPS,
        "A checkpoint every this many optimizer steps.",
    ),
    int(
        "trainer",
        "keep_checkpoints",
        1,
        1 << 10,
        "Checkpoints kept.",
    ),
    int(
        "trainer",
        "collective_timeout_s",
        1,
        1 << 20,
        "Seconds a rank waits in one collective call before it gives up.",
    ),
    int(
        "embedded",
        "num_layers",
        1,
        1 << 10,
        "Decoder blocks of the embedded model.",
    ),
    int(
        "embedded",
        "hidden_size",
        64,
        MAX_DIM,
        "Width of the embedded model.",
    ),
    int(
        "embedded",
        "intermediate_size",
        64,
        MAX_DIM,
        "SwiGLU width of the embedded model.",
    ),
    int(
        "embedded",
        "num_attention_heads",
        1,
        1 << 10,
        "Query heads of the embedded model.",
    ),
    int(
        "embedded",
        "num_key_value_heads",
        1,
        1 << 10,
        "Key/value heads of the embedded model.",
    ),
    int(
        "embedded",
        "vocab_size",
        258,
        MAX_DIM,
        "Vocabulary of the embedded model (256 bytes, BOS, EOS, padding).",
    ),
    int(
        "embedded",
        "weight_seed",
        0,
        u32::MAX as u64,
        "Seed of the embedded model's frozen weights.",
    ),
    int(
        "embedded",
        "seq_len",
        2,
        1 << 20,
        "Sequence length of the embedded run.",
    ),
    int(
        "embedded",
        "max_steps",
        1,
        MAX_STEPS,
        "Optimizer steps of the embedded run.",
    ),
    float(
        "embedded",
        "learning_rate",
        0.0,
        1.0,
        true,
        "Peak learning rate of the embedded run.",
    ),
    int(
        "embedded",
        "warmup_steps",
        0,
        MAX_STEPS,
        "Warmup steps of the embedded run.",
    ),
    int(
        "embedded",
        "eval_every",
        1,
        MAX_STEPS,
        "Validation interval of the embedded run.",
    ),
    int(
        "embedded",
        "checkpoint_every",
        1,
        MAX_STEPS,
        "Checkpoint interval of the embedded run.",
    ),
    float(
        "coefficients",
        "runtime_mib",
        0.0,
        1e6,
        false,
        "The process without a model (runtime, tokenizer, data), MiB.",
    ),
    float(
        "coefficients",
        "load_tensor",
        0.0,
        100.0,
        false,
        "Copies of the largest tensor alive while it is read and quantized.",
    ),
    float(
        "coefficients",
        "adapters",
        0.0,
        100.0,
        false,
        "Copies of the adapters (value, gradient, AdamW moments, checkpoint buffers).",
    ),
    float(
        "coefficients",
        "logits_forward",
        0.0,
        100.0,
        false,
        "Copies of the logits (batch x seq x vocab) kept from the forward pass to the end of backward.",
    ),
    float(
        "coefficients",
        "logits_backward",
        0.0,
        100.0,
        false,
        "Copies of the logits alive while the output head's backward runs (their gradient).",
    ),
    float(
        "coefficients",
        "head",
        0.0,
        100.0,
        false,
        "Copies of the dense output head (vocab x hidden) while its backward runs.",
    ),
    float(
        "coefficients",
        "block_hidden",
        0.0,
        1000.0,
        false,
        "Copies of hidden-wide activations per token of each block whose graph is kept (or rebuilt).",
    ),
    float(
        "coefficients",
        "block_intermediate",
        0.0,
        1000.0,
        false,
        "Copies of SwiGLU-wide activations per token of each block whose graph is kept (or rebuilt).",
    ),
    float(
        "coefficients",
        "block_attention",
        0.0,
        1000.0,
        false,
        "Copies of the attention scores (batch x heads x seq x seq) of each block whose graph is kept (or rebuilt).",
    ),
    float(
        "coefficients",
        "checkpoint_hidden",
        0.0,
        100.0,
        false,
        "Copies of each adapted block's saved input with checkpointing.",
    ),
    float(
        "coefficients",
        "backward_hidden",
        0.0,
        1000.0,
        false,
        "Copies of hidden-wide gradients per token of the block whose backward runs.",
    ),
    float(
        "coefficients",
        "backward_intermediate",
        0.0,
        1000.0,
        false,
        "Copies of SwiGLU-wide gradients per token of the block whose backward runs.",
    ),
    float(
        "coefficients",
        "backward_attention",
        0.0,
        1000.0,
        false,
        "Copies of the attention scores' gradients of the block whose backward runs.",
    ),
    float(
        "fit",
        "estimate_share",
        0.0,
        1.0,
        true,
        "Share of the budget a fitted run's estimate may take (room for the model's error).",
    ),
    int(
        "fit",
        "min_seq_len",
        2,
        1 << 20,
        "Shortest sequence the fit cuts to.",
    ),
    int(
        "fit",
        "min_lora_layers",
        1,
        1 << 16,
        "Fewest adapted blocks the fit cuts to.",
    ),
];

/// `[trainer]` and `[embedded]`: every key of [`SETTINGS`] present, none
/// unknown, each in its range (integers whole). Dimensions of the embedded
/// model must be multiples of the NF4 block (64) where it quantizes them.
fn settings(c: &mut Checker, t: &Loaded) -> Vec<(&'static Setting, f64)> {
    use model::{DEFAULTS, MEMORY};
    let mut out = Vec::new();
    for (file, section, table) in [
        (DEFAULTS, "trainer", &t.defaults.trainer),
        (DEFAULTS, "embedded", &t.defaults.embedded),
        (MEMORY, "coefficients", &t.memory.coefficients),
        (MEMORY, "fit", &t.memory.fit),
    ] {
        for (key, v) in table.get_ref() {
            if !SETTINGS
                .iter()
                .any(|s| s.section == section && s.name == key)
            {
                let known: Vec<&str> = SETTINGS
                    .iter()
                    .filter(|s| s.section == section)
                    .map(|s| s.name)
                    .collect();
                c.err(
                    file,
                    v.span(),
                    format!(
                        "unknown key \"{key}\" in [{section}] (known: {})",
                        known.join(", ")
                    ),
                );
            }
        }
        for s in SETTINGS.iter().filter(|s| s.section == section) {
            let Some(v) = table.get_ref().get(s.name) else {
                c.err(
                    file,
                    table.span(),
                    format!("[{section}] lacks \"{}\"", s.name),
                );
                continue;
            };
            let x = *v.get_ref();
            let ok = match s.kind {
                SettingKind::Float { lo, hi, open_low } => {
                    x.is_finite() && x <= hi && if open_low { x > lo } else { x >= lo }
                }
                SettingKind::Int { lo, hi } => x.fract() == 0.0 && x >= lo as f64 && x <= hi as f64,
            };
            if !ok {
                let range = match s.kind {
                    SettingKind::Float {
                        lo,
                        hi,
                        open_low: true,
                    } => format!("a number in ({lo}, {hi}]"),
                    SettingKind::Float {
                        lo,
                        hi,
                        open_low: false,
                    } => format!("a number in [{lo}, {hi}]"),
                    SettingKind::Int { lo, hi } => format!("an integer in {lo}..={hi}"),
                };
                c.err(
                    file,
                    v.span(),
                    format!("{} is {x}, must be {range}", s.name),
                );
            }
            out.push((s, x));
        }
    }
    let get = |name: &str| {
        out.iter()
            .find(|(s, _)| s.section == "embedded" && s.name == name)
            .map_or(0.0, |(_, x)| *x) as u64
    };
    let (hidden, inter, heads, kv) = (
        get("hidden_size"),
        get("intermediate_size"),
        get("num_attention_heads"),
        get("num_key_value_heads"),
    );
    let span = t.defaults.embedded.span();
    if hidden % 64 != 0 || inter % 64 != 0 {
        c.err(
            DEFAULTS,
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
        c.err(DEFAULTS, span, "[embedded] num_attention_heads must divide hidden_size into an even head width, and num_key_value_heads must divide num_attention_heads");
    }
    out
}

/// `memory.toml`'s `[[reference_shape]]`: at least one; every size
/// positive; heads divide the width into an even head width and KV heads
/// divide the heads.
fn reference_shapes(c: &mut Checker, t: &Loaded) -> Vec<RefShape> {
    use model::MEMORY;
    if t.memory.reference_shape.is_empty() {
        c.err(
            MEMORY,
            0..0,
            "no [[reference_shape]]: the memory model needs at least one",
        );
    }
    let mut out = Vec::new();
    for s in &t.memory.reference_shape {
        let r = s.get_ref();
        let mut dim = |v: &toml::Spanned<i64>, what: &str| -> u64 {
            u64::from(c.int(MEMORY, v, what, 1, 1 << 24))
        };
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
            c.err(
                MEMORY,
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
            c.err(
                MEMORY,
                s.span(),
                "heads must divide hidden into an even head width, and kv_heads must divide heads",
            );
        }
        out.push(shape);
    }
    out
}

/// `profile.toml`: names are identifiers and unique, kinds known, docs one
/// non-empty line, and exactly one key of kind "tier".
fn profile_keys(c: &mut Checker, t: &Loaded) -> Vec<ProfileKey> {
    use model::PROFILE;
    let mut keys = Vec::new();
    let mut seen = HashMap::new();
    let mut tier_key: Option<Range<usize>> = None;
    if t.profile.key.is_empty() {
        c.err(PROFILE, 0..0, "no [[key]] is defined");
    }
    for k in &t.profile.key {
        let r = k.get_ref();
        c.identifier(PROFILE, &r.name, "profile key");
        c.unique(
            PROFILE,
            &mut seen,
            r.name.get_ref().clone(),
            r.name.span(),
            "profile key",
        );
        let kind = match r.kind.get_ref().as_str() {
            "count" => KeyKind::Count,
            "flag" => KeyKind::Flag,
            "tier" => KeyKind::Tier,
            other => {
                c.err(
                    PROFILE,
                    r.kind.span(),
                    format!("unknown key kind \"{other}\" (known: count, flag, tier)"),
                );
                KeyKind::Count
            }
        };
        if kind == KeyKind::Tier {
            match &tier_key {
                Some(first) => {
                    let at = c.sources[PROFILE].at(first);
                    c.err(
                        PROFILE,
                        r.kind.span(),
                        format!(
                            "key \"{}\" is a second key of kind \"tier\" (first at {at}); #[profile(tier)] must name one key",
                            r.name.get_ref()
                        ),
                    );
                }
                None => tier_key = Some(r.kind.span()),
            }
            if !*r.in_profile.get_ref() {
                c.err(
                    PROFILE,
                    r.in_profile.span(),
                    format!(
                        "the tier key \"{}\" must have in_profile = true: scaling reads it",
                        r.name.get_ref()
                    ),
                );
            }
        }
        let doc = r.doc.get_ref().trim();
        if doc.is_empty() || doc.contains('\n') {
            c.err(
                PROFILE,
                r.doc.span(),
                format!(
                    "doc of key \"{}\" must be one non-empty line",
                    r.name.get_ref()
                ),
            );
        }
        keys.push(ProfileKey {
            name: r.name.get_ref().clone(),
            kind,
            required: *r.required.get_ref(),
            in_profile: *r.in_profile.get_ref(),
            doc: doc.to_string(),
        });
    }
    if tier_key.is_none() && !t.profile.key.is_empty() {
        c.err(
            PROFILE,
            0..0,
            "no [[key]] of kind \"tier\": scaling needs the profile's tier",
        );
    }
    keys
}

fn rank_in_limits(c: &mut Checker, file: usize, v: &toml::Spanned<i64>, l: &Limits) -> u32 {
    let rank = c.int(
        file,
        v,
        "lora_rank",
        i64::from(l.lora_rank_min),
        i64::from(l.lora_rank_max),
    );
    if l.lora_rank_multiple_of > 0 && !rank.is_multiple_of(l.lora_rank_multiple_of) {
        c.err(
            file,
            v.span(),
            format!(
                "lora_rank {rank} must be a multiple of {}",
                l.lora_rank_multiple_of
            ),
        );
    }
    rank
}

fn layers_in_limits(c: &mut Checker, file: usize, v: &toml::Spanned<i64>, l: &Limits) -> u32 {
    c.int(
        file,
        v,
        "lora_num_layers",
        i64::from(l.lora_num_layers_min),
        i64::from(l.lora_num_layers_max),
    )
}

/// A `budget_fraction` of `[section]`, in (0, 1].
fn fraction(c: &mut Checker, v: &toml::Spanned<f64>, section: &str) -> f64 {
    let f = *v.get_ref();
    if !(f > 0.0 && f <= 1.0) {
        c.err(
            model::HARDWARE,
            v.span(),
            format!("[{section}] budget_fraction is {f}, must be in (0, 1]"),
        );
    }
    f
}

/// The `[[SECTION.profile]]` rows: memory only (no variant), listed smallest
/// memory first without duplicates, and rank, layers and batch never
/// shrinking as memory grows.
fn memory_rows(
    c: &mut Checker,
    section: &str,
    section_span: Range<usize>,
    rows: &[toml::Spanned<RawProfile>],
    tiers: &[String],
    l: &Limits,
) -> Vec<MemoryRow> {
    use model::HARDWARE;
    let mut out: Vec<MemoryRow> = Vec::new();
    let mut seen: HashMap<u32, Range<usize>> = HashMap::new();
    if rows.is_empty() {
        c.err(
            HARDWARE,
            section_span,
            format!("[{section}] has no [[{section}.profile]] row"),
        );
    }
    for row in rows {
        let r = row.get_ref();
        if let Some(v) = &r.variant {
            c.err(
                HARDWARE,
                v.span(),
                format!("a [[{section}.profile]] row is chosen by memory alone and must not name a variant"),
            );
        }
        let Some(m) = &r.memory_gb else {
            c.err(
                HARDWARE,
                row.span(),
                format!("a [[{section}.profile]] row needs memory_gb"),
            );
            continue;
        };
        let memory_gb = c.int(HARDWARE, m, "memory_gb", 1, 1 << 20);
        let profile = profile(c, r, tiers, l);
        if let Some(first) = seen.get(&memory_gb) {
            let at = c.sources[HARDWARE].at(first);
            c.err(
                HARDWARE,
                m.span(),
                format!(
                    "duplicate [[{section}.profile]] row for memory_gb {memory_gb} (first at {at})"
                ),
            );
            continue;
        }
        seen.insert(memory_gb, m.span());
        if let Some(prev) = out.last() {
            if memory_gb < prev.memory_gb {
                c.err(
                    HARDWARE,
                    m.span(),
                    format!(
                        "memory_gb {memory_gb} is below {} of the row before (rows are listed smallest memory first)",
                        prev.memory_gb
                    ),
                );
            } else {
                let checks = [
                    (
                        "batch_size",
                        &r.batch_size,
                        profile.batch_size,
                        prev.profile.batch_size,
                    ),
                    (
                        "lora_rank",
                        &r.lora_rank,
                        profile.lora_rank,
                        prev.profile.lora_rank,
                    ),
                    (
                        "lora_num_layers",
                        &r.lora_num_layers,
                        profile.lora_num_layers,
                        prev.profile.lora_num_layers,
                    ),
                ];
                for (what, span, now, before) in checks {
                    if now < before {
                        c.err(
                            HARDWARE,
                            span.span(),
                            format!(
                                "{what} {now} of the {memory_gb} GB row is below {before} of the {} GB row (profiles must not shrink as memory grows)",
                                prev.memory_gb
                            ),
                        );
                    }
                }
            }
        }
        out.push(MemoryRow { memory_gb, profile });
    }
    out
}

/// `[[cpu.simd]]`: unique identifier names, each with at least one flag, every
/// flag an identifier shown by one feature only.
fn simd_features(c: &mut Checker, features: &[toml::Spanned<model::Simd>]) -> Vec<SimdFeature> {
    use model::HARDWARE;
    let mut out = Vec::new();
    let mut names = HashMap::new();
    let mut flags_seen = HashMap::new();
    for f in features {
        let r = f.get_ref();
        c.identifier(HARDWARE, &r.name, "SIMD feature name");
        c.unique(
            HARDWARE,
            &mut names,
            r.name.get_ref().clone(),
            r.name.span(),
            "SIMD feature",
        );
        if r.flags.is_empty() {
            c.err(
                HARDWARE,
                f.span(),
                format!("SIMD feature \"{}\" lists no flags", r.name.get_ref()),
            );
        }
        for flag in &r.flags {
            c.identifier(HARDWARE, flag, "cpuinfo flag");
            c.unique(
                HARDWARE,
                &mut flags_seen,
                flag.get_ref().clone(),
                flag.span(),
                "cpuinfo flag",
            );
        }
        out.push(SimdFeature {
            name: r.name.get_ref().clone(),
            flags: r.flags.iter().map(|f| f.get_ref().clone()).collect(),
        });
    }
    out
}

fn profile(c: &mut Checker, r: &RawProfile, tiers: &[String], l: &Limits) -> Profile {
    Profile {
        batch_size: c.int(model::HARDWARE, &r.batch_size, "batch_size", 1, 1 << 20),
        lora_rank: rank_in_limits(c, model::HARDWARE, &r.lora_rank, l),
        lora_num_layers: layers_in_limits(c, model::HARDWARE, &r.lora_num_layers, l),
        grad_checkpoint: *r.grad_checkpoint.get_ref(),
        tier: c.lookup(model::HARDWARE, tiers, &r.tier, "tier"),
    }
}

/// Whether every match of `hir` starts with an ASCII digit.
fn starts_with_digit(hir: &regex_syntax::hir::Hir) -> bool {
    use regex_syntax::hir::{Class, HirKind};
    match hir.kind() {
        HirKind::Literal(lit) => lit.0.first().is_some_and(u8::is_ascii_digit),
        HirKind::Class(Class::Bytes(c)) => c
            .ranges()
            .iter()
            .all(|r| r.start().is_ascii_digit() && r.end().is_ascii_digit()),
        HirKind::Class(Class::Unicode(c)) => c
            .ranges()
            .iter()
            .all(|r| r.start().is_ascii_digit() && r.end().is_ascii_digit()),
        HirKind::Repetition(rep) => rep.min >= 1 && starts_with_digit(&rep.sub),
        HirKind::Capture(cap) => starts_with_digit(&cap.sub),
        HirKind::Concat(parts) => parts.first().is_some_and(starts_with_digit),
        HirKind::Alternation(alts) => alts.iter().all(starts_with_digit),
        HirKind::Empty | HirKind::Look(_) => false,
    }
}

/// A count in billions, in (0, 1e6), as a parameter count.
fn billions(c: &mut Checker, file: usize, v: &toml::Spanned<f64>, what: &str) -> u64 {
    let b = *v.get_ref();
    if !(b > 0.0 && b < 1.0e6) {
        c.err(
            file,
            v.span(),
            format!("{what} is {b}, must be in (0, 1000000)"),
        );
        return 0;
    }
    (b * BILLION as f64).round() as u64
}
