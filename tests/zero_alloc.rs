//! One million detections and scalings allocate nothing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use qlora_scale::{
    Profile, ScaledProfile, SizeCategory, Tier, detect_model_size, scale_profile_for_model,
};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn a_million_detections_and_scalings_allocate_nothing() {
    let names: [&[u8]; 8] = [
        b"NousResearch/Hermes-2-Pro-Mistral-7B",
        b"Qwen/Qwen2.5-0.5B-Instruct",
        b"mlx-community/Meta-Llama-3-8B-Instruct-4bit",
        b"microsoft/phi-2",
        b"some-org/unknown-model",
        b"C:\\models\\Llama-2-13b-hf\\",
        b"\xff\xfe/model-70b",
        b"",
    ];
    let profile = Profile {
        batch_size: 4,
        lora_rank: 128,
        lora_num_layers: 24,
        grad_checkpoint: false,
        model_tier: Tier::Large,
    };
    // The DFAs are validated once, on first use; that may allocate nothing
    // either, but keep it out of the count.
    let _ = detect_model_size("warm-up-7b");

    COUNTING.with(|c| c.set(true));
    let mut checksum = 0u64;
    for i in 0..1_000_000usize {
        let name = names[i % names.len()];
        let size = detect_model_size(name);
        let scaled = scale_profile_for_model(&profile, name);
        checksum = checksum
            .wrapping_add(size.params)
            .wrapping_add(u64::from(scaled.lora_rank));
    }
    COUNTING.with(|c| c.set(false));

    assert_ne!(checksum, 0);
    assert_eq!(ALLOCATIONS.load(Ordering::Relaxed), 0);
}

/// A derived profile type with narrow and wide counts and a carried field.
#[derive(Clone, ScaledProfile)]
struct MyRun {
    batch_size: u64,
    lora_rank: u32,
    #[profile(key = "lora_num_layers")]
    layers: u16,
    grad_checkpoint: bool,
    #[profile(tier)]
    tier: Tier,
    learning_rate: f64,
}

#[test]
fn derived_scaling_allocates_nothing() {
    let names: [&str; 5] = [
        "NousResearch/Hermes-2-Pro-Mistral-7B",
        "huihui-ai/DeepSeek-R1-Distill-Qwen-14B",
        "microsoft/phi-2",
        "meta-llama/Llama-2-70b-hf",
        "some-org/unknown-model",
    ];
    let run = MyRun {
        batch_size: 4,
        lora_rank: 128,
        layers: 24,
        grad_checkpoint: false,
        tier: Tier::Large,
        learning_rate: 2e-4,
    };
    let _ = detect_model_size("warm-up-7b");

    COUNTING.with(|c| c.set(true));
    let mut checksum = 0u64;
    for i in 0..200_000usize {
        let scaled = run.scaled_for(names[i % names.len()]);
        let by_category = run.scaled_for_category(SizeCategory::ALL[i % SizeCategory::ALL.len()]);
        checksum = checksum
            .wrapping_add(scaled.batch_size)
            .wrapping_add(u64::from(by_category.layers));
    }
    COUNTING.with(|c| c.set(false));

    assert_ne!(checksum, 0);
    assert_eq!(ALLOCATIONS.load(Ordering::Relaxed), 0);
}
