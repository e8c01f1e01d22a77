use qlora_scale::{ScaledProfile, Tier};

#[derive(Clone, ScaledProfile)]
struct Run {
    batch_size: u32,
    lora_rank: u32,
    lora_num_layers: u32,
    grad_checkpoint: u8,
    model_tier: Tier,
}

fn main() {}
