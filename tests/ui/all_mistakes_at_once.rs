// Four mistakes, four errors, and no cascade: the stub impl keeps the use of
// the trait below from adding errors of its own.
use qlora_scale::{ScaledProfile, Tier};

#[derive(Clone, ScaledProfile)]
struct Run {
    #[profile(key = "batch_sise")]
    batch: u32,
    lora_rank: f32,
    #[profile(key = "lora_rank")]
    rank: u32,
    model_tier: Tier,
}

fn main() {
    let run = Run { batch: 1, lora_rank: 1.0, rank: 8, model_tier: Tier::Large };
    let _ = run.scaled_for("meta-llama/Llama-2-7b-hf");
}
