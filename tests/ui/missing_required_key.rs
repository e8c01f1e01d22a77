use qlora_scale::{ScaledProfile, Tier};

// No field holds `lora_num_layers`; `layers` is an ordinary field.
#[derive(Clone, ScaledProfile)]
struct Run {
    batch_size: u32,
    lora_rank: u32,
    layers: u32,
    model_tier: Tier,
}

fn main() {}
