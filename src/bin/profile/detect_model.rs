//! `profile detect-model`: one line per name, from arguments or stdin.

use std::io::{self, BufRead, IsTerminal, Write};

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use qlora_scale::files::detect_model_size_local;
use qlora_scale::report::chain_message;
use qlora_scale::train::spec::looks_like_path;
use qlora_scale::{ModelSize, detect_model_size};
use serde_json::json;

use crate::args::DetectModelArgs;
use crate::render::{params_b_json, params_b_text};

/// A name that is a local path but gives no size.
#[derive(Debug, thiserror::Error)]
pub enum LocalPathError {
    /// The path looks like one (`./`, `/`, `~`) or was meant as one, but
    /// nothing is there.
    #[error("{}: no such file or directory", path.display())]
    Missing {
        /// The path as given.
        path: PathBuf,
    },
    /// Nothing there gives a size: no readable `config.json`, safetensors or
    /// GGUF file, and the name writes none.
    #[error(
        "{}: no readable model file gives a size (config.json, *.safetensors, *.gguf), and the name writes none",
        path.display()
    )]
    Unsized {
        /// The path as given.
        path: PathBuf,
        /// The first file that could not be read, if any.
        #[source]
        problem: Option<qlora_scale::files::FilesError>,
    },
}

/// How many names could not be sized, for the exit status.
#[derive(Debug, thiserror::Error)]
#[error("{failed} of {total} names could not be sized (see above)")]
struct SomeFailed {
    failed: usize,
    total: usize,
}

/// Runs `detect-model`: the arguments' names, else stdin's lines. A local
/// path that gives no size is reported on stderr and the others still
/// print; the command then fails.
pub fn run(args: &DetectModelArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let mut tally = Tally::default();
    if !args.names.is_empty() {
        for name in &args.names {
            tally.detect(out, name.as_encoded_bytes(), args.json)?;
        }
    } else {
        let stdin = io::stdin();
        if stdin.is_terminal() {
            let _ = writeln!(
                io::stderr(),
                "reading model names from stdin, one per line (end with Ctrl-D)"
            );
        }
        detect_lines(&mut stdin.lock(), out, args.json, &mut tally)?;
    }
    tally.result()
}

/// Names seen and names that failed.
#[derive(Default)]
pub struct Tally {
    total: usize,
    failed: usize,
}

impl Tally {
    /// Writes the line for `name`, or reports on stderr why it has none.
    fn detect(&mut self, out: &mut dyn Write, name: &[u8], json: bool) -> anyhow::Result<()> {
        self.total += 1;
        match size_of(name) {
            Ok(size) => write_detection(out, name, size, json).context("cannot write to stdout"),
            Err(e) => {
                self.failed += 1;
                let _ = writeln!(io::stderr(), "error: {}", chain_message(&e));
                Ok(())
            }
        }
    }

    fn result(&self) -> anyhow::Result<()> {
        if self.failed == 0 {
            return Ok(());
        }
        Err(SomeFailed {
            failed: self.failed,
            total: self.total,
        }
        .into())
    }
}

/// Detects every non-empty line of `input` (surrounding whitespace and `\r`
/// ignored). Lines need not be UTF-8: detection works on bytes, and the name
/// is printed with invalid sequences replaced.
pub fn detect_lines(
    input: &mut dyn BufRead,
    out: &mut dyn Write,
    json: bool,
    tally: &mut Tally,
) -> anyhow::Result<()> {
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = input
            .read_until(b'\n', &mut line)
            .context("cannot read model names from stdin")?;
        if n == 0 {
            return Ok(());
        }
        let name = line.trim_ascii();
        if name.is_empty() {
            continue;
        }
        tally.detect(out, name, json)?;
    }
}

/// `name` as a path (on Unix any bytes; elsewhere UTF-8 only).
fn as_path(name: &[u8]) -> Option<&Path> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Some(Path::new(std::ffi::OsStr::from_bytes(name)))
    }
    #[cfg(not(unix))]
    {
        std::str::from_utf8(name).ok().map(Path::new)
    }
}

/// The size of `name`. A name is a local path when something is there or
/// it looks like one (`./m`, `/m`, `~/m`, as `train --model` tells them
/// apart); a path is sized from its files, else from its name (the files'
/// problems reported on stderr), and is an error when neither gives a size
/// or nothing is there. Any other name is sized from the name.
fn size_of(name: &[u8]) -> Result<ModelSize, LocalPathError> {
    let Some(path) = as_path(name) else {
        return Ok(detect_model_size(name));
    };
    let exists = path.exists();
    if !exists && !looks_like_path(&String::from_utf8_lossy(name)) {
        return Ok(detect_model_size(name));
    }
    if !exists {
        return Err(LocalPathError::Missing {
            path: path.to_path_buf(),
        });
    }
    let (size, problems) = detect_model_size_local(path);
    if !size.is_known() {
        return Err(LocalPathError::Unsized {
            path: path.to_path_buf(),
            problem: problems.into_iter().next(),
        });
    }
    for e in problems {
        warn_unread(&e);
    }
    Ok(size)
}

/// Reports on stderr a local model file that gave no count: the error and
/// its causes.
pub fn warn_unread(e: &qlora_scale::files::FilesError) {
    let _ = writeln!(
        io::stderr(),
        "warning: {}; using the name instead",
        chain_message(e)
    );
}

/// Writes the line for one name: `NAME<TAB>CATEGORY<TAB>PARAMS_B`, or a JSON
/// object.
fn write_detection(
    out: &mut dyn Write,
    name: &[u8],
    size: ModelSize,
    json: bool,
) -> io::Result<()> {
    let shown = String::from_utf8_lossy(name);
    if json {
        let value = json!({
            "name": shown,
            "category": size.category.name(),
            "params_b": params_b_json(size.params),
            "source": size.source,
        });
        serde_json::to_writer(&mut *out, &value)?;
        writeln!(out)
    } else {
        writeln!(
            out,
            "{shown}\t{}\t{}",
            size.category.name(),
            params_b_text(size.params)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detect(input: &[u8], json: bool) -> String {
        let mut out = Vec::new();
        let mut tally = Tally::default();
        detect_lines(&mut &input[..], &mut out, json, &mut tally).unwrap();
        tally.result().unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn lines_skip_blanks_and_strip_line_ends() {
        let out = detect(b"org/model-14b-chat\r\n\n   \nmicrosoft/phi-2", false);
        assert_eq!(
            out,
            "org/model-14b-chat\tmedium\t14\nmicrosoft/phi-2\tsmall\t3\n"
        );
    }

    #[test]
    fn invalid_utf8_is_detected_on_bytes_and_printed_lossily() {
        let out = detect(b"org/\xff\xfe-70b\n", false);
        assert_eq!(out, "org/\u{fffd}\u{fffd}-70b\txlarge\t70\n");
    }

    #[test]
    fn json_lines() {
        let out = detect(b"org/bert-base\n", true);
        assert_eq!(
            out,
            "{\"name\":\"org/bert-base\",\"category\":\"small\",\"params_b\":null,\"source\":\"unknown\"}\n"
        );
    }
}
