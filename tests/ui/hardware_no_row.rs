const P: qlora_scale::Profile = qlora_scale::hardware_profile!(ultra, 100);

fn main() {}
