//! Compile-fail tests of `#[derive(ScaledProfile)]` and `hardware_profile!`:
//! one file per mistake, each `.stderr` reviewed. The messages depend on the
//! compiler's wording, so `rust-toolchain.toml` pins the version they were
//! blessed on. Re-bless with `TRYBUILD=overwrite cargo test --test ui` and
//! review the diff.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
