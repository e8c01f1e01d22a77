// A const profile checked at compile time: this assertion is wrong (scaling a
// large-tier row for a 7B model lowers the rank to 32), so it does not build.
use qlora_scale::{Profile, SizeCategory, hardware_profile, scale_profile_for_category};

const ULTRA_192: Profile = hardware_profile!(ultra, 192);
const FOR_7B: Profile = scale_profile_for_category(ULTRA_192, SizeCategory::Small);
const _: () = assert!(FOR_7B.lora_rank == 256, "scaling kept the rank");

fn main() {}
