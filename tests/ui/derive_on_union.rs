use qlora_scale::ScaledProfile;

#[derive(Clone, Copy, ScaledProfile)]
union Run {
    batch_size: u32,
    lora_rank: u32,
}

fn main() {}
