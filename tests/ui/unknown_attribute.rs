use qlora_scale::{ScaledProfile, Tier};

#[derive(Clone, ScaledProfile)]
struct Run {
    batch_size: u32,
    #[profile(rename = "lora_rank")]
    lora_rank: u32,
    #[profile(skp)]
    lora_num_layers: u32,
    model_tier: Tier,
}

fn main() {}
