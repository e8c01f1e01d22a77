const P: qlora_scale::Profile = qlora_scale::hardware_profile!(96, ultra);

fn main() {}
