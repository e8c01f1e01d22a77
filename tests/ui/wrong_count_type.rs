use qlora_scale::{ScaledProfile, Tier};

#[derive(Clone, ScaledProfile)]
struct Run {
    batch_size: u32,
    lora_rank: String,
    lora_num_layers: u32,
    model_tier: Tier,
}

fn main() {}
