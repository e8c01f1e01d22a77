const P: qlora_scale::Profile = qlora_scale::hardware_profile!(ultr, 96);
const H: qlora_scale::HardwareProfile = qlora_scale::hardware_profile!(m9, mx, 64);

fn main() {}
