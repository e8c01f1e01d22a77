//! The CLI tests' temporary directories.

/// A temporary directory whose name has no digit. Model paths under it are
/// sized from their names, ancestors included (as a Hugging Face cache path
/// is): a random name such as `.tmpjzXh4B` read as a 4B model and made a
/// test of an unsizable folder fail now and then.
pub fn digitless_tempdir() -> tempfile::TempDir {
    for _ in 0..1000 {
        let dir = tempfile::Builder::new()
            .prefix("sandbox-")
            .tempdir()
            .expect("temporary directory");
        let name = dir.path().file_name().unwrap_or_default();
        if !name.to_string_lossy().bytes().any(|b| b.is_ascii_digit()) {
            return dir;
        }
    }
    panic!("no temporary directory name without a digit in 1000 tries");
}
