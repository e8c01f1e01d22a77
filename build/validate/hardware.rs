//! `tables/hardware.toml`: Apple Silicon variants, generations and profile
//! rows; the `[gpu]` and `[cpu]` rows by memory; SIMD features.

use std::collections::HashMap;
use std::ops::Range;

use toml::Spanned;

use super::super::model::{Apple, HardwareFile, RawProfile, Simd};
use super::checker::{FileChecker, Seen};
use super::size::{layers_in_limits, rank_in_limits};
use super::{Generation, HardwareRow, Limits, MemoryRow, Profile, SimdFeature};

/// What `hardware.toml` contributes to [`super::Tables`].
pub(super) struct Hardware {
    pub budget_fraction: f64,
    pub variants: Vec<String>,
    pub variant_detect_order: Vec<usize>,
    pub default_variant: usize,
    pub generations: Vec<Generation>,
    pub memory_options: Vec<Vec<u32>>,
    pub gpu_core_batch_floors: Vec<(u32, u32)>,
    pub fallback_profile: Profile,
    pub profiles: Vec<HardwareRow>,
    pub gpu_budget_fraction: f64,
    pub gpu_rows: Vec<MemoryRow>,
    pub cpu_budget_fraction: f64,
    pub cpu_rows: Vec<MemoryRow>,
    pub simd: Vec<SimdFeature>,
}

/// Checks `hardware.toml`; profiles name tiers of `tiers` and lie within
/// `limits` (both from `size.toml`).
pub(super) fn check(
    f: &mut FileChecker,
    h: &HardwareFile,
    tiers: &[String],
    limits: &Limits,
) -> Hardware {
    let bf = *h.budget_fraction.get_ref();
    if !(bf > 0.0 && bf <= 1.0) {
        f.err(
            h.budget_fraction.span(),
            format!("budget_fraction is {bf}, must be in (0, 1]"),
        );
    }
    let a = h.apple.get_ref();
    let mut seen = Seen::new("variant");
    let mut variants = Vec::new();
    for v in &a.variants {
        f.unique_identifier(&mut seen, v, "variant name");
        variants.push(v.get_ref().clone());
    }
    let mut variant_detect_order = Vec::new();
    for v in &a.variant_detect_order {
        variant_detect_order.push(f.lookup(&variants, v, "variant"));
    }
    let default_variant = f.lookup(&variants, &a.default_variant, "variant");
    let generations = generations(f, a, &variants);
    let memory_options = memory_options(f, a, &variants);
    let mut gpu_core_batch_floors = Vec::new();
    for fl in &a.gpu_core_batch_floor {
        let r = fl.get_ref();
        gpu_core_batch_floors.push((
            f.int(&r.min_gpu_cores, "min_gpu_cores", 1, 100_000),
            f.int(&r.min_batch_size, "min_batch_size", 1, 1 << 20),
        ));
    }
    let fallback_profile = fallback_profile(f, a, tiers, limits);
    let profiles = apple_profiles(f, a, &variants, tiers, limits);

    let gpu = h.gpu.get_ref();
    let gpu_budget_fraction = fraction(f, &gpu.budget_fraction, "gpu");
    let gpu_rows = memory_rows(f, "gpu", h.gpu.span(), &gpu.profile, tiers, limits);
    let cpu = h.cpu.get_ref();
    let cpu_budget_fraction = fraction(f, &cpu.budget_fraction, "cpu");
    let cpu_rows = memory_rows(f, "cpu", h.cpu.span(), &cpu.profile, tiers, limits);
    let simd = simd_features(f, &cpu.simd);
    Hardware {
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
    }
}

/// `[[apple.generation]]`: unique identifier names, GPU cores for every
/// variant and no other.
fn generations(f: &mut FileChecker, a: &Apple, variants: &[String]) -> Vec<Generation> {
    let mut generations = Vec::new();
    let mut seen = Seen::new("generation");
    for g in &a.generation {
        let r = g.get_ref();
        f.unique_identifier(&mut seen, &r.name, "generation name");
        let cores = r.gpu_cores.get_ref();
        let mut per_variant = Vec::new();
        for v in variants {
            match cores.get(v) {
                Some(n) => per_variant.push(f.int(n, "gpu_cores", 1, 100_000)),
                None => {
                    f.err(
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
                f.err(
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
    generations
}

/// `apple.memory_options_gb`: a list for every variant and no other.
fn memory_options(f: &mut FileChecker, a: &Apple, variants: &[String]) -> Vec<Vec<u32>> {
    let mem = a.memory_options_gb.get_ref();
    let mut memory_options = Vec::new();
    for v in variants {
        match mem.get(v) {
            Some(list) => memory_options.push(
                list.get_ref()
                    .iter()
                    .map(|m| f.int(m, "memory option", 1, 1 << 20))
                    .collect(),
            ),
            None => {
                f.err(
                    a.memory_options_gb.span(),
                    format!("memory_options_gb has no entry for variant \"{v}\""),
                );
                memory_options.push(Vec::new());
            }
        }
    }
    for (k, list) in mem {
        if !variants.contains(k) {
            f.err(
                list.span(),
                format!(
                    "memory_options_gb names unknown variant \"{k}\" (known: {})",
                    variants.join(", ")
                ),
            );
        }
    }
    memory_options
}

/// `[apple.fallback_profile]`: a profile naming no variant and no memory.
fn fallback_profile(f: &mut FileChecker, a: &Apple, tiers: &[String], limits: &Limits) -> Profile {
    let fb = a.fallback_profile.get_ref();
    if let Some(v) = &fb.variant {
        f.err(
            v.span(),
            "the fallback profile applies to every variant and must not name one",
        );
    }
    if let Some(m) = &fb.memory_gb {
        f.err(
            m.span(),
            "the fallback profile applies to every memory size and must not name one",
        );
    }
    profile(f, fb, tiers, limits)
}

/// `[[apple.profile]]`: each names a known variant and a memory size, no
/// (variant, memory) twice, and every variant has a row.
fn apple_profiles(
    f: &mut FileChecker,
    a: &Apple,
    variants: &[String],
    tiers: &[String],
    limits: &Limits,
) -> Vec<HardwareRow> {
    let mut profiles = Vec::new();
    let mut seen = Seen::new("profile for (variant, memory_gb)");
    for p in &a.profile {
        let r = p.get_ref();
        let (Some(v), Some(m)) = (&r.variant, &r.memory_gb) else {
            f.err(
                p.span(),
                "a hardware profile needs both variant and memory_gb",
            );
            continue;
        };
        let variant = f.lookup(variants, v, "variant");
        let memory_gb = f.int(m, "memory_gb", 1, 1 << 20);
        f.unique(
            &mut seen,
            format!("{} {}", v.get_ref(), m.get_ref()),
            p.span(),
        );
        profiles.push(HardwareRow {
            variant,
            memory_gb,
            profile: profile(f, r, tiers, limits),
        });
    }
    for (i, v) in variants.iter().enumerate() {
        if !profiles.iter().any(|p| p.variant == i) {
            f.err(
                a.variants[i].span(),
                format!("variant \"{v}\" has no [[apple.profile]] row"),
            );
        }
    }
    profiles
}

/// A `budget_fraction` of `[section]`, in (0, 1].
fn fraction(f: &mut FileChecker, v: &Spanned<f64>, section: &str) -> f64 {
    let x = *v.get_ref();
    if !(x > 0.0 && x <= 1.0) {
        f.err(
            v.span(),
            format!("[{section}] budget_fraction is {x}, must be in (0, 1]"),
        );
    }
    x
}

/// The `[[SECTION.profile]]` rows: memory only (no variant), listed smallest
/// memory first without duplicates, and rank, layers and batch never
/// shrinking as memory grows.
fn memory_rows(
    f: &mut FileChecker,
    section: &str,
    section_span: Range<usize>,
    rows: &[Spanned<RawProfile>],
    tiers: &[String],
    l: &Limits,
) -> Vec<MemoryRow> {
    let mut out: Vec<MemoryRow> = Vec::new();
    let mut seen: HashMap<u32, Range<usize>> = HashMap::new();
    if rows.is_empty() {
        f.err(
            section_span,
            format!("[{section}] has no [[{section}.profile]] row"),
        );
    }
    for row in rows {
        let r = row.get_ref();
        if let Some(v) = &r.variant {
            f.err(
                v.span(),
                format!("a [[{section}.profile]] row is chosen by memory alone and must not name a variant"),
            );
        }
        let Some(m) = &r.memory_gb else {
            f.err(
                row.span(),
                format!("a [[{section}.profile]] row needs memory_gb"),
            );
            continue;
        };
        let memory_gb = f.int(m, "memory_gb", 1, 1 << 20);
        let profile = profile(f, r, tiers, l);
        if let Some(first) = seen.get(&memory_gb) {
            let at = f.at(first);
            f.err(
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
                f.err(
                    m.span(),
                    format!(
                        "memory_gb {memory_gb} is below {} of the row before (rows are listed smallest memory first)",
                        prev.memory_gb
                    ),
                );
            } else {
                never_shrinks(f, r, memory_gb, &profile, prev);
            }
        }
        out.push(MemoryRow { memory_gb, profile });
    }
    out
}

/// A row's batch size, rank and layers are not below those of `prev`, the
/// row of the next smaller memory.
fn never_shrinks(
    f: &mut FileChecker,
    r: &RawProfile,
    memory_gb: u32,
    profile: &Profile,
    prev: &MemoryRow,
) {
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
            f.err(
                span.span(),
                format!(
                    "{what} {now} of the {memory_gb} GB row is below {before} of the {} GB row (profiles must not shrink as memory grows)",
                    prev.memory_gb
                ),
            );
        }
    }
}

/// `[[cpu.simd]]`: unique identifier names, each with at least one flag, every
/// flag an identifier shown by one feature only.
fn simd_features(f: &mut FileChecker, features: &[Spanned<Simd>]) -> Vec<SimdFeature> {
    let mut out = Vec::new();
    let mut names = Seen::new("SIMD feature");
    let mut flags_seen = Seen::new("cpuinfo flag");
    for feature in features {
        let r = feature.get_ref();
        f.unique_identifier(&mut names, &r.name, "SIMD feature name");
        if r.flags.is_empty() {
            f.err(
                feature.span(),
                format!("SIMD feature \"{}\" lists no flags", r.name.get_ref()),
            );
        }
        for flag in &r.flags {
            f.unique_identifier(&mut flags_seen, flag, "cpuinfo flag");
        }
        out.push(SimdFeature {
            name: r.name.get_ref().clone(),
            flags: r.flags.iter().map(|f| f.get_ref().clone()).collect(),
        });
    }
    out
}

/// A profile row's values: batch size in range, rank and layers within the
/// limits, a known tier.
fn profile(f: &mut FileChecker, r: &RawProfile, tiers: &[String], l: &Limits) -> Profile {
    Profile {
        batch_size: f.int(&r.batch_size, "batch_size", 1, 1 << 20),
        lora_rank: rank_in_limits(f, &r.lora_rank, l),
        lora_num_layers: layers_in_limits(f, &r.lora_num_layers, l),
        grad_checkpoint: *r.grad_checkpoint.get_ref(),
        tier: f.lookup(tiers, &r.tier, "tier"),
    }
}
