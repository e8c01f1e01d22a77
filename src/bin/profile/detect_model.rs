//! `profile detect-model`: one line per name, from arguments or stdin.

use std::io::{self, BufRead, IsTerminal, Write};

use anyhow::Context as _;
use qlora_scale::ModelSize;
use qlora_scale::files::detect_model_size_local;
use qlora_scale::report::chain_message;
use serde_json::json;

use crate::args::DetectModelArgs;
use crate::render::{params_b_json, params_b_text};

/// Runs `detect-model`: the arguments' names, else stdin's lines.
pub fn run(args: &DetectModelArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    if !args.names.is_empty() {
        for name in &args.names {
            write_detection(out, name.as_encoded_bytes(), args.json)
                .context("cannot write to stdout")?;
        }
        return Ok(());
    }
    let stdin = io::stdin();
    if stdin.is_terminal() {
        let _ = writeln!(
            io::stderr(),
            "reading model names from stdin, one per line (end with Ctrl-D)"
        );
    }
    detect_lines(&mut stdin.lock(), out, args.json)
}

/// Detects every non-empty line of `input` (surrounding whitespace and `\r`
/// ignored). Lines need not be UTF-8: detection works on bytes, and the name
/// is printed with invalid sequences replaced.
pub fn detect_lines(
    input: &mut dyn BufRead,
    out: &mut dyn Write,
    json: bool,
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
        write_detection(out, name, json).context("cannot write to stdout")?;
    }
}

/// The size of `name`: from its files when it is a local path, else from the
/// name. A local path whose files cannot be read is reported on stderr.
fn local_or_name(name: &[u8]) -> ModelSize {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let path = std::path::Path::new(std::ffi::OsStr::from_bytes(name));
        let (size, problems) = detect_model_size_local(path);
        for e in problems {
            warn_unread(&e);
        }
        size
    }
    #[cfg(not(unix))]
    {
        match std::str::from_utf8(name) {
            Ok(s) => {
                let (size, problems) = detect_model_size_local(std::path::Path::new(s));
                for e in problems {
                    warn_unread(&e);
                }
                size
            }
            Err(_) => qlora_scale::detect_model_size(name),
        }
    }
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
fn write_detection(out: &mut dyn Write, name: &[u8], json: bool) -> io::Result<()> {
    let size = local_or_name(name);
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
        detect_lines(&mut &input[..], &mut out, json).unwrap();
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
