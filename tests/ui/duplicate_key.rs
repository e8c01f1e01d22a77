use qlora_scale::{ScaledProfile, Tier};

#[derive(Clone, ScaledProfile)]
struct Run {
    batch_size: u32,
    lora_rank: u32,
    lora_num_layers: u32,
    #[profile(key = "lora_rank")]
    rank_again: u32,
    model_tier: Tier,
}

fn main() {}
