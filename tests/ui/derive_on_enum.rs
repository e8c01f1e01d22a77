use qlora_scale::ScaledProfile;

#[derive(Clone, ScaledProfile)]
enum Run {
    Small { lora_rank: u32 },
    Large { lora_rank: u32 },
}

fn main() {}
