//! Emits the Rust source for the validated tables.
//!
//! The output is deterministic (table order, fixed phf seed) and formatted with
//! prettyplease, so a diff of the generated code is a diff of the data.

use proc_macro2::{Ident, Literal, Span, TokenStream};
use quote::quote;
use unicase::Ascii;

use super::dfa;
use super::diag::Source;
use super::validate::{KeyKind, PatternKind, Profile, SettingKind, Tables};

/// `small` -> `Small`, `m1` -> `M1`, `x_large` -> `XLarge`.
pub fn camel(name: &str) -> String {
    name.split('_')
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(c) => c.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

fn ident(name: &str) -> Ident {
    Ident::new(name, Span::call_site())
}

/// FNV-1a, 64 bits: enough to tell table versions apart in the provenance
/// header (not a security hash; a dependency would be heavier than these
/// five lines).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A `phf::Map<Ascii<&'static str>, V>` static, keys compared ASCII
/// case-insensitively.
fn phf_map(
    name: &str,
    value_ty: TokenStream,
    doc: &str,
    entries: &[(String, String)],
) -> TokenStream {
    let mut map = phf_codegen::Map::<Ascii<&str>>::new();
    map.phf_path("::phf");
    for (k, v) in entries {
        map.entry(Ascii::new(k.as_str()), v.as_str());
    }
    let body: TokenStream = map
        .build()
        .to_string()
        .parse()
        .expect("phf_codegen emits valid Rust");
    let name = ident(name);
    let doc = format!(" {doc}");
    quote! {
        #[doc = #doc]
        pub static #name: ::phf::Map<Ascii<&'static str>, #value_ty> = #body;
    }
}

/// A fieldless enum over table names, with `ALL`, `name()` and a phf lookup.
fn name_enum(ty: &str, doc: &str, names: &[String], lookup: &str) -> TokenStream {
    let ty_ident = ident(ty);
    let variants: Vec<Ident> = names.iter().map(|n| ident(&camel(n))).collect();
    let n = Literal::usize_unsuffixed(names.len());
    let docs: Vec<String> = names.iter().map(|n| format!(" `{n}`")).collect();
    let doc = format!(" {doc}");
    let entries: Vec<(String, String)> = names
        .iter()
        .zip(&variants)
        .map(|(name, v)| (name.clone(), format!("{ty}::{v}")))
        .collect();
    let map = phf_map(
        lookup,
        quote!(#ty_ident),
        &format!("[`{ty}`] by name, ASCII case-insensitive."),
        &entries,
    );
    quote! {
        #[doc = #doc]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum #ty_ident {
            #( #[doc = #docs] #variants, )*
        }
        impl #ty_ident {
            /// Every value, in table order.
            pub const ALL: [#ty_ident; #n] = [ #( #ty_ident::#variants ),* ];
            /// The name used in the tables and in profiles.
            pub const fn name(self) -> &'static str {
                match self { #( #ty_ident::#variants => #names, )* }
            }
            /// Position in table order.
            pub const fn index(self) -> usize {
                self as usize
            }
        }
        #map
    }
}

fn u32_lit(v: u32) -> Literal {
    Literal::u32_unsuffixed(v)
}

fn u64_lit(v: u64) -> Literal {
    Literal::u64_unsuffixed(v)
}

fn f64_lit(v: f64) -> Literal {
    Literal::f64_unsuffixed(v)
}

fn profile_expr(t: &Tables, p: &Profile) -> TokenStream {
    let batch = u32_lit(p.batch_size);
    let rank = u32_lit(p.lora_rank);
    let layers = u32_lit(p.lora_num_layers);
    let gc = p.grad_checkpoint;
    let tier = ident(&camel(&t.tiers[p.tier]));
    quote! {
        Profile {
            batch_size: #batch,
            lora_rank: #rank,
            lora_num_layers: #layers,
            grad_checkpoint: #gc,
            model_tier: Tier::#tier,
        }
    }
}

fn aligned_dfa(name: &str, file: &str, doc: &str) -> TokenStream {
    let name = ident(name);
    let path = format!("/{file}");
    let doc = format!(" {doc}");
    quote! {
        #[doc = #doc]
        pub static #name: &AlignedDfaBytes<[u8]> = &AlignedDfaBytes {
            _align: [],
            bytes: *include_bytes!(concat!(env!("OUT_DIR"), #path)),
        };
    }
}

/// The whole generated file.
pub fn emit(t: &Tables, override_splits: &[dfa::OverrideSplit], sources: &[Source]) -> String {
    let mut items = Vec::new();
    items.extend(size_items(t));
    items.push(detect_items(t, override_splits));
    items.extend(known_model_items(t));
    items.push(known_architectures(t));
    items.extend(apple_items(t));
    items.push(memory_row_items(t));
    items.push(train_default_items(t));
    // Trainer and embedded-model defaults.
    items.push(settings(t));
    // Profile keys.
    items.push(profile_keys(t));
    render(&items, sources)
}

/// Tiers and categories (`tables/size.toml`).
fn size_items(t: &Tables) -> Vec<TokenStream> {
    let mut items = Vec::new();
    items.push(name_enum(
        "Tier",
        "Model tiers, smallest first (`tables/size.toml`, `[tiers]`).",
        &t.tiers,
        "TIER_BY_NAME",
    ));
    let default_tier = ident(&camel(&t.tiers[t.default_tier]));
    items.push(quote! {
        impl Tier {
            /// The tier of a profile whose tier is missing or unknown.
            pub const DEFAULT: Tier = Tier::#default_tier;
        }
    });
    let cat_names: Vec<String> = t.categories.iter().map(|c| c.name.clone()).collect();
    items.push(name_enum(
        "SizeCategory",
        "Size categories of models, smallest first (`tables/size.toml`, `[[category]]`).",
        &cat_names,
        "CATEGORY_BY_NAME",
    ));
    let configs = t.categories.iter().map(|c| {
        let cat = ident(&camel(&c.name));
        let max = match c.max_params {
            Some(m) => {
                let m = u64_lit(m);
                quote!(Some(#m))
            }
            None => quote!(None),
        };
        let rank = u32_lit(c.lora_rank);
        let layers = u32_lit(c.lora_num_layers);
        let mult = f64_lit(c.batch_size_multiplier);
        let tier = ident(&camel(&t.tiers[c.tier]));
        quote! {
            SizeConfig {
                category: SizeCategory::#cat,
                max_params: #max,
                lora_rank: #rank,
                lora_num_layers: #layers,
                batch_size_multiplier: #mult,
                tier: Tier::#tier,
            }
        }
    });
    let n_cat = Literal::usize_unsuffixed(t.categories.len());
    let cap = u32_lit(t.batch_size_cap);
    let default_batch = u32_lit(t.default_batch_size);
    let l = &t.limits;
    let (rmin, rmax, rmul) = (
        u32_lit(l.lora_rank_min),
        u32_lit(l.lora_rank_max),
        u32_lit(l.lora_rank_multiple_of),
    );
    let (lmin, lmax) = (
        u32_lit(l.lora_num_layers_min),
        u32_lit(l.lora_num_layers_max),
    );
    let mmax = f64_lit(l.batch_size_multiplier_max);
    items.push(quote! {
        /// The scaling configuration of each category, in the order of
        /// [`SizeCategory::ALL`].
        pub const SIZE_CONFIGS: [SizeConfig; #n_cat] = [ #( #configs ),* ];
        /// Scaled batch sizes never exceed this.
        pub const BATCH_SIZE_CAP: u32 = #cap;
        /// Batch size assumed when a profile has none.
        pub const DEFAULT_BATCH_SIZE: u32 = #default_batch;
        /// Bounds on ranks, layer counts and multipliers.
        pub const LIMITS: Limits = Limits {
            lora_rank_min: #rmin,
            lora_rank_max: #rmax,
            lora_rank_multiple_of: #rmul,
            lora_num_layers_min: #lmin,
            lora_num_layers_max: #lmax,
            batch_size_multiplier_max: #mmax,
        };
    });
    items
}

/// Detection patterns, units, families, MoE layouts and path rules
/// (`tables/detect.toml`, and the families of `tables/known_models.toml`).
fn detect_items(t: &Tables, override_splits: &[dfa::OverrideSplit]) -> TokenStream {
    let kinds = t.patterns.iter().map(|(k, _)| match k {
        PatternKind::Size => quote!(PatternKind::Size),
        PatternKind::Ignore => quote!(PatternKind::Ignore),
        PatternKind::Moe => quote!(PatternKind::Moe),
    });
    let texts = t.patterns.iter().map(|(_, p)| p.as_str());
    let n_pat = Literal::usize_unsuffixed(t.patterns.len());
    let units = t.units.iter().map(|&u| u64_lit(u));
    let family = |f: &super::validate::FamilyRule| {
        let (s, p) = (f.substring.as_str(), u64_lit(f.params));
        quote!(Family { substring: #s, params: #p })
    };
    let overriding: Vec<TokenStream> = override_splits
        .iter()
        .map(|o| {
            let (prefix, rest, p) = (o.prefix.as_str(), o.rest.as_str(), u64_lit(o.params));
            quote!(OverrideFamily { prefix: #prefix, rest: #rest, params: #p })
        })
        .collect();
    let fallback: Vec<TokenStream> = t
        .families
        .iter()
        .filter(|f| !f.overrides)
        .map(family)
        .collect();
    let n_override = Literal::usize_unsuffixed(overriding.len());
    let n_fallback = Literal::usize_unsuffixed(fallback.len());
    let moe = t.moe.iter().map(|m| {
        let (e, x, total) = (
            u32_lit(m.experts),
            u64_lit(m.expert_params),
            u64_lit(m.total_params),
        );
        quote!(MoeLayout { experts: #e, expert_params: #x, total_params: #total })
    });
    let n_moe = Literal::usize_unsuffixed(t.moe.len());
    let skip = t.skip_segments.iter().map(String::as_str);
    let n_skip = Literal::usize_unsuffixed(t.skip_segments.len());
    let hash_min_len = Literal::usize_unsuffixed(t.hash_min_len as usize);
    let cache_separator = t.cache_separator.as_str();
    let cache_prefix = t.cache_prefix.as_str();
    let disagreement = f64_lit(t.disagreement_fraction);
    let max_header = Literal::u64_unsuffixed(u64::from(t.max_safetensors_header_bytes));
    quote! {
        /// What each detection pattern marks, by pattern id.
        pub const PATTERN_KINDS: [PatternKind; #n_pat] = [ #( #kinds ),* ];
        /// The regex of each detection pattern, by pattern id.
        pub const PATTERN_SOURCES: [&str; #n_pat] = [ #( #texts ),* ];
        /// Parameters per unit, indexed by the unit's lower-case letter minus `b'a'`;
        /// 0 where the letter is no unit.
        pub const UNIT_PARAMS: [u64; 26] = [ #( #units ),* ];
        /// Families that beat a size written in the name, split at their own
        /// written size, in priority order.
        pub const OVERRIDE_FAMILIES: [OverrideFamily; #n_override] = [ #( #overriding ),* ];
        /// Families for names that write no size, in priority order (by
        /// pattern id of [`FALLBACK_DFA`]).
        pub const FALLBACK_FAMILIES: [Family; #n_fallback] = [ #( #fallback ),* ];
        /// Mixture-of-experts layouts with a known total.
        pub const MOE_LAYOUTS: [MoeLayout; #n_moe] = [ #( #moe ),* ];
        /// Path components skipped when looking for a model's name.
        pub const SKIP_SEGMENTS: [&str; #n_skip] = [ #( #skip ),* ];
        /// A component of at least this many hex digits is a hash: skipped.
        pub const HASH_MIN_LEN: usize = #hash_min_len;
        /// Sources of a local model's size that differ from the chosen count
        /// by more than this fraction are reported as disagreeing.
        pub const DISAGREEMENT_FRACTION: f64 = #disagreement;
        /// Safetensors headers longer than this many bytes are refused
        /// before they are read.
        pub const MAX_SAFETENSORS_HEADER_BYTES: u64 = #max_header;
        /// A cache component (`models--ORG--NAME`) starts with this.
        pub const CACHE_PREFIX: &str = #cache_prefix;
        /// In a cache component the name follows the last one.
        pub const CACHE_SEPARATOR: &str = #cache_separator;
    }
}

/// `KNOWN_ARCHITECTURES` and `SHAPE_SUFFIXES` (`tables/known_models.toml`,
/// `[[architecture]]` and `[shape_match]`).
fn known_architectures(t: &Tables) -> TokenStream {
    let n = Literal::usize_unsuffixed(t.known_shapes.len());
    let rows = t.known_shapes.iter().map(|a| {
        let (id, names) = (a.id.as_str(), a.names.iter().map(String::as_str));
        let (layers, hidden, inter) = (
            u64_lit(a.layers),
            u64_lit(a.hidden),
            u64_lit(a.intermediate),
        );
        let (heads, kv, head_dim) = (u64_lit(a.heads), u64_lit(a.kv_heads), u64_lit(a.head_dim));
        let (vocab, tied, bias) = (u64_lit(a.vocab), a.tied, a.qkv_bias);
        quote! {
            KnownArchitecture {
                id: #id,
                names: &[ #( #names ),* ],
                shape: crate::memory::Architecture {
                    layers: #layers,
                    hidden: #hidden,
                    intermediate: #inter,
                    heads: #heads,
                    kv_heads: #kv,
                    head_dim: #head_dim,
                    vocab: #vocab,
                    tied: #tied,
                    qkv_bias: #bias,
                    fused_projections: false,
                },
            }
        }
    });
    let n_suffixes = Literal::usize_unsuffixed(t.shape_suffixes.len());
    let suffixes = t.shape_suffixes.iter().map(String::as_str);
    quote! {
        /// Published architectures of known models, in table order.
        pub const KNOWN_ARCHITECTURES: [KnownArchitecture; #n] = [ #( #rows ),* ];
        /// Words a name may carry after a known architecture's name and still
        /// match it (`-Instruct`, `-bnb-4bit`).
        pub const SHAPE_SUFFIXES: [&str; #n_suffixes] = [ #( #suffixes ),* ];
    }
}

/// Models known by exact name (`tables/known_models.toml`) and the two DFAs.
fn known_model_items(t: &Tables) -> Vec<TokenStream> {
    let mut items = Vec::new();
    let known_entries: Vec<(String, String)> = t
        .known_models
        .iter()
        .map(|(n, p, _)| (n.clone(), format!("{p}u64")))
        .collect();
    let known_names = t.known_models.iter().map(|(n, _, _)| n.as_str());
    let n_known = Literal::usize_unsuffixed(t.known_models.len());
    items.push(quote! {
        /// The names in [`KNOWN_MODEL_PARAMS`], in table order (the detector
        /// derives a prefilter from them).
        pub const KNOWN_MODEL_NAMES: [&str; #n_known] = [ #( #known_names ),* ];
    });
    items.push(phf_map(
        "KNOWN_MODEL_PARAMS",
        quote!(u64),
        "Parameter counts of models known by exact name (last path component), ASCII case-insensitive.",
        &known_entries,
    ));
    let (table_capacity, max_states) = (
        Literal::usize_unsuffixed(dfa::SIZE_TABLE_CAPACITY),
        Literal::usize_unsuffixed(dfa::SIZE_MAX_STATES),
    );
    items.push(quote! {
        /// Entries of the detector's flat table of the size DFA (states x
        /// byte classes rounded up to a power of two); the generator checks
        /// that the size DFA fits.
        pub const SIZE_DFA_TABLE_CAPACITY: usize = #table_capacity;
        /// Most states of that table.
        pub const SIZE_DFA_MAX_STATES: usize = #max_states;
    });
    items.push(aligned_dfa(
        "SIZE_DFA",
        dfa::SIZE,
        "DFA of the size patterns: leftmost-first, anchored at a digit run's start.",
    ));
    items.push(aligned_dfa(
        "FALLBACK_DFA",
        dfa::FALLBACK,
        "DFA of the other families' substrings (all matches).",
    ));
    items
}

/// Apple Silicon variants, generations and profile rows
/// (`tables/hardware.toml`).
fn apple_items(t: &Tables) -> Vec<TokenStream> {
    let mut items = Vec::new();
    items.push(name_enum(
        "ChipVariant",
        "Apple Silicon chip variants (`tables/hardware.toml`, `apple.variants`).",
        &t.variants,
        "VARIANT_BY_NAME",
    ));
    let gen_names: Vec<String> = t.generations.iter().map(|g| g.name.clone()).collect();
    items.push(name_enum(
        "Generation",
        "Apple Silicon generations (`tables/hardware.toml`, `[[apple.generation]]`).",
        &gen_names,
        "GENERATION_BY_NAME",
    ));
    let n_var = Literal::usize_unsuffixed(t.variants.len());
    let n_gen = Literal::usize_unsuffixed(t.generations.len());
    let cores = t.generations.iter().map(|g| {
        let c = g.gpu_cores.iter().map(|&c| u32_lit(c));
        quote!([ #( #c ),* ])
    });
    let detect_order = t
        .variant_detect_order
        .iter()
        .map(|&v| ident(&camel(&t.variants[v])));
    let n_detect = Literal::usize_unsuffixed(t.variant_detect_order.len());
    let default_variant = ident(&camel(&t.variants[t.default_variant]));
    let memory = t.memory_options.iter().map(|m| {
        let m = m.iter().map(|&x| u32_lit(x));
        quote!(&[ #( #m ),* ])
    });
    let floors = t.gpu_core_batch_floors.iter().map(|&(c, b)| {
        let (c, b) = (u32_lit(c), u32_lit(b));
        quote!(CoreBatchFloor { min_gpu_cores: #c, min_batch_size: #b })
    });
    let n_floor = Literal::usize_unsuffixed(t.gpu_core_batch_floors.len());
    let fallback = profile_expr(t, &t.fallback_profile);
    let budget = f64_lit(t.budget_fraction);
    let by_variant = (0..t.variants.len()).map(|v| {
        let rows = t.profiles.iter().filter(|r| r.variant == v).map(|r| {
            let variant = ident(&camel(&t.variants[r.variant]));
            let mem = u32_lit(r.memory_gb);
            let p = profile_expr(t, &r.profile);
            quote!(HardwareRow { variant: ChipVariant::#variant, memory_gb: #mem, profile: #p })
        });
        quote!(&[ #( #rows ),* ])
    });
    items.push(quote! {
        /// Share of memory a training run may use.
        pub const BUDGET_FRACTION: f64 = #budget;
        /// GPU cores by generation, then variant (both by `index()`).
        pub const GPU_CORES: [[u32; #n_var]; #n_gen] = [ #( #cores ),* ];
        /// Variants read from a chip name, first match wins.
        pub const VARIANT_DETECT_ORDER: [ChipVariant; #n_detect] = [ #( ChipVariant::#detect_order ),* ];
        /// The variant of a chip name that names none.
        pub const DEFAULT_VARIANT: ChipVariant = ChipVariant::#default_variant;
        /// Memory sizes (GB) each variant is sold with, by variant `index()`.
        pub const MEMORY_OPTIONS_GB: [&[u32]; #n_var] = [ #( #memory ),* ];
        /// Batch-size floors by GPU core count; every one that applies is applied.
        pub const GPU_CORE_BATCH_FLOORS: [CoreBatchFloor; #n_floor] = [ #( #floors ),* ];
        /// The profile used when no row matches the variant.
        pub const FALLBACK_PROFILE: Profile = #fallback;
        /// Hardware profile rows by variant `index()`, in table order.
        pub const HARDWARE_ROWS: [&[HardwareRow]; #n_var] = [ #( #by_variant ),* ];
    });
    items
}

/// Machines other than Apple Silicon: the `[gpu]` and `[cpu]` rows and SIMD
/// features (`tables/hardware.toml`).
fn memory_row_items(t: &Tables) -> TokenStream {
    let memory_rows = |rows: &[super::validate::MemoryRow]| -> Vec<TokenStream> {
        rows.iter()
            .map(|r| {
                let mem = u32_lit(r.memory_gb);
                let p = profile_expr(t, &r.profile);
                quote!(MemoryRow { memory_gb: #mem, profile: #p })
            })
            .collect()
    };
    let gpu_rows = memory_rows(&t.gpu_rows);
    let cpu_rows = memory_rows(&t.cpu_rows);
    let (n_gpu, n_cpu) = (
        Literal::usize_unsuffixed(gpu_rows.len()),
        Literal::usize_unsuffixed(cpu_rows.len()),
    );
    let (gpu_budget, cpu_budget) = (
        f64_lit(t.gpu_budget_fraction),
        f64_lit(t.cpu_budget_fraction),
    );
    let simd = t.simd.iter().map(|f| {
        let name = f.name.as_str();
        let flags = f.flags.iter().map(String::as_str);
        quote!(SimdFeature { name: #name, flags: &[ #( #flags ),* ] })
    });
    let n_simd = Literal::usize_unsuffixed(t.simd.len());
    quote! {
        /// Share of one GPU's memory a training run may use.
        pub const GPU_BUDGET_FRACTION: f64 = #gpu_budget;
        /// Profiles by the memory (GB) of one GPU, smallest first.
        pub const GPU_ROWS: [MemoryRow; #n_gpu] = [ #( #gpu_rows ),* ];
        /// Share of the memory a CPU run may use.
        pub const CPU_BUDGET_FRACTION: f64 = #cpu_budget;
        /// Profiles by the memory (GB) a CPU run may use, smallest first.
        pub const CPU_ROWS: [MemoryRow; #n_cpu] = [ #( #cpu_rows ),* ];
        /// SIMD features reported for a CPU, in table order.
        pub const SIMD_FEATURES: [SimdFeature; #n_simd] = [ #( #simd ),* ];
    }
}

/// `[train]` defaults (`tables/defaults.toml`).
fn train_default_items(t: &Tables) -> TokenStream {
    let default_model = t.default_model.as_str();
    let alpha = f64_lit(t.lora_alpha_per_rank);
    quote! {
        /// The model trained when none is given.
        pub const DEFAULT_MODEL: &str = #default_model;
        /// LoRA alpha defaults to this many times the rank.
        pub const LORA_ALPHA_PER_RANK: f64 = #alpha;
    }
}

/// `pub mod trainer { pub const LEARNING_RATE: f64 = ...; }` and
/// `pub mod embedded { ... }`: floats as `f64`, integers as `u64`.
fn settings(t: &Tables) -> TokenStream {
    let mut modules = Vec::new();
    for (section, module, doc) in [
        (
            "trainer",
            "trainer",
            "The training loop's defaults (`tables/defaults.toml`, `[trainer]`).",
        ),
        (
            "embedded",
            "embedded",
            "The built-in model of `train` (`tables/defaults.toml`, `[embedded]`).",
        ),
        (
            "coefficients",
            "memory",
            "The memory model's coefficients and reference architectures (`tables/memory.toml`).",
        ),
        (
            "fit",
            "memory_fit",
            "Limits of the auto-fit (`tables/memory.toml`, `[fit]`).",
        ),
    ] {
        let consts = t
            .settings
            .iter()
            .filter(|(s, _)| s.section == section)
            .map(|(s, x)| {
                let name = ident(&s.name.to_ascii_uppercase());
                let d = s.doc;
                match s.kind {
                    SettingKind::Float { .. } => {
                        let v = f64_lit(*x);
                        quote! { #[doc = #d] pub const #name: f64 = #v; }
                    }
                    SettingKind::Int { .. } => {
                        let v = u64_lit(*x as u64);
                        quote! { #[doc = #d] pub const #name: u64 = #v; }
                    }
                    SettingKind::Flag => {
                        let v = *x != 0.0;
                        quote! { #[doc = #d] pub const #name: bool = #v; }
                    }
                }
            });
        let extra = if module == "memory" {
            reference_shapes(t)
        } else {
            TokenStream::new()
        };
        let m = ident(module);
        modules.push(quote! { #[doc = #doc] pub mod #m { #( #consts )* #extra } });
    }
    quote! { #( #modules )* }
}

/// `REFERENCE_SHAPES`: the `[[reference_shape]]`s, in table order.
fn reference_shapes(t: &Tables) -> TokenStream {
    let n = t.reference_shapes.len();
    let shapes = t.reference_shapes.iter().map(|r| {
        let source = &r.source;
        let (layers, hidden, inter) = (
            u64_lit(r.layers),
            u64_lit(r.hidden),
            u64_lit(r.intermediate),
        );
        let (heads, kv, vocab) = (u64_lit(r.heads), u64_lit(r.kv_heads), u64_lit(r.vocab));
        let tied = r.tied;
        quote! {
            super::ReferenceShape {
                source: #source,
                layers: #layers,
                hidden: #hidden,
                intermediate: #inter,
                heads: #heads,
                kv_heads: #kv,
                vocab: #vocab,
                tied: #tied,
            }
        }
    });
    quote! {
        /// Published architectures, for models known only by their size.
        pub const REFERENCE_SHAPES: [super::ReferenceShape; #n] = [ #( #shapes ),* ];
    }
}

fn kind_variant(kind: KeyKind) -> Ident {
    ident(&camel(kind.name()))
}

/// `PROFILE_KEYS`, the `profile_keys` name constants, and a compile-time
/// check that the keys marked `in_profile` are exactly `Profile`'s fields,
/// each of its kind's type.
fn profile_keys(t: &Tables) -> TokenStream {
    let n = Literal::usize_unsuffixed(t.profile_keys.len());
    let entries = t.profile_keys.iter().map(|k| {
        let (name, required, in_profile, doc) = (&k.name, k.required, k.in_profile, &k.doc);
        let kind = kind_variant(k.kind);
        quote! {
            ProfileKey {
                name: #name,
                kind: ProfileKeyKind::#kind,
                required: #required,
                in_profile: #in_profile,
                doc: #doc,
            }
        }
    });
    let consts = t.profile_keys.iter().map(|k| {
        let c = ident(&k.name.to_ascii_uppercase());
        let name = &k.name;
        let doc = format!(" {}", k.doc);
        quote! {
            #[doc = #doc]
            pub const #c: &str = #name;
        }
    });
    let fields: Vec<Ident> = t
        .profile_keys
        .iter()
        .filter(|k| k.in_profile)
        .map(|k| ident(&k.name))
        .collect();
    let types = t
        .profile_keys
        .iter()
        .filter(|k| k.in_profile)
        .map(|k| match k.kind {
            KeyKind::Count => quote!(u32),
            KeyKind::Flag => quote!(bool),
            KeyKind::Tier => quote!(Tier),
        });
    quote! {
        /// Profile keys (`tables/profile.toml`), in table order.
        pub const PROFILE_KEYS: [ProfileKey; #n] = [ #( #entries ),* ];
        /// Profile key names, as saved profiles and dynamic maps spell them.
        pub mod profile_keys {
            #( #consts )*
        }
        /// The keys marked `in_profile` are exactly [`Profile`]'s fields, each
        /// of its kind's type: a table and the struct cannot drift apart.
        const _: fn(Profile) = |Profile { #( #fields ),* }| {
            #( let _: #types = #fields; )*
        };
    }
}

/// The schema `qlora-scale-macros` compiles in: profile keys, variant and
/// generation names, and the hardware rows, as plain data
/// (`macros/src/schema.rs` declares the types). Tiers and categories reach
/// the derive's output as the library's generated enums.
pub fn emit_macro_schema(t: &Tables, sources: &[Source]) -> String {
    let keys = t.profile_keys.iter().map(|k| {
        let (name, required, in_profile, doc) = (&k.name, k.required, k.in_profile, &k.doc);
        let kind = kind_variant(k.kind);
        quote! {
            KeySchema {
                name: #name,
                kind: KeyKind::#kind,
                required: #required,
                in_profile: #in_profile,
                doc: #doc,
            }
        }
    });
    let variants = &t.variants;
    let generations = t.generations.iter().map(|g| g.name.as_str());
    let rows = t.profiles.iter().map(|r| {
        let v = Literal::usize_unsuffixed(r.variant);
        let m = u32_lit(r.memory_gb);
        quote!((#v, #m))
    });
    let items = [quote! {
        /// Profile keys, in table order.
        pub const PROFILE_KEYS: &[KeySchema] = &[ #( #keys ),* ];
        /// Chip variant names, in `ChipVariant::ALL` order.
        pub const VARIANTS: &[&str] = &[ #( #variants ),* ];
        /// Generation names, in `Generation::ALL` order.
        pub const GENERATIONS: &[&str] = &[ #( #generations ),* ];
        /// Hardware rows: (variant index, memory in GB), in table order.
        pub const HARDWARE_ROWS: &[(usize, u32)] = &[ #( #rows ),* ];
    }];
    render(&items, sources)
}

/// Formats `items` under the provenance header.
fn render(items: &[TokenStream], sources: &[Source]) -> String {
    let file: syn::File = syn::parse2(quote!( #( #items )* )).expect("generated code parses");
    let mut out = String::from(
        "// @generated by build/emit.rs (qlora-scale's table generator). Do not edit:\n",
    );
    out.push_str("// change tables/*.toml and rebuild. Inputs (FNV-1a 64):\n");
    for s in sources {
        out.push_str(&format!(
            "//   {} {:016x}\n",
            s.display,
            fnv1a64(s.text.as_bytes())
        ));
    }
    out.push('\n');
    out.push_str(&prettyplease::unparse(&file));
    out
}
