use qlora_scale::{ScaledProfile, Tier};

#[derive(Clone, ScaledProfile)]
struct Run {
    #[profile(key)]
    batch_size: u32,
    #[profile = "lora_rank"]
    lora_rank: u32,
    lora_num_layers: u32,
    #[profile(tier = "large")]
    model_tier: Tier,
}

fn main() {}
