use qlora_scale::{ScaledProfile, Tier};

#[derive(Clone, ScaledProfile)]
#[profile(tier)]
struct Run {
    batch_size: u32,
    #[profile(key = "lora_rank", key = "lora_num_layers")]
    lora_rank: u32,
    lora_num_layers: u32,
    #[profile(tier, skip)]
    model_tier: Tier,
}

fn main() {}
