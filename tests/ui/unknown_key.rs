use qlora_scale::{ScaledProfile, Tier};

#[derive(Clone, ScaledProfile)]
struct Run {
    batch_size: u32,
    #[profile(key = "lora_rnk")]
    rank: u32,
    lora_rank: u32,
    lora_num_layers: u32,
    model_tier: Tier,
}

fn main() {}
