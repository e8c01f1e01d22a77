use qlora_scale::ScaledProfile;

#[derive(Clone, ScaledProfile)]
struct Run {
    batch_size: u32,
    lora_rank: u32,
    lora_num_layers: u32,
    #[profile(tier)]
    tier: &'static str,
}

fn main() {}
