//! Diagnostics that point at a table's file, line and column.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;

/// One table file as read from disk.
pub struct Source {
    /// Path on disk.
    pub path: PathBuf,
    /// Path as shown in messages: `tables/FILE.toml`.
    pub display: String,
    /// File contents.
    pub text: String,
}

impl Source {
    /// 1-based line and column of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text.as_bytes()[..offset];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let col = self.text[line_start..offset].chars().count() + 1;
        (line, col)
    }

    /// A diagnostic at the start of `span`.
    pub fn error(&self, span: Range<usize>, message: impl Into<String>) -> Diagnostic {
        let (line, col) = self.line_col(span.start);
        Diagnostic {
            file: self.display.clone(),
            line,
            col,
            message: message.into(),
        }
    }

    /// `LINE:COL` of a span, for "first at" notes.
    pub fn at(&self, span: &Range<usize>) -> String {
        let (line, col) = self.line_col(span.start);
        format!("{line}:{col}")
    }
}

/// A problem in a table: `tables/FILE.toml:LINE:COL: message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    /// 1-based; 0 when the problem concerns the whole file.
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl Diagnostic {
    /// A problem with a whole file (missing, unreadable).
    pub fn file(file: impl Into<String>, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            file: file.into(),
            line: 0,
            col: 0,
            message: message.into(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.col, self.message
            )
        }
    }
}
