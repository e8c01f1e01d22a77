//! Collecting diagnostics, one table file at a time.

use std::collections::HashMap;
use std::ops::Range;

use toml::Spanned;

use super::super::diag::{Diagnostic, Source};
use super::BILLION;

/// Every problem found so far, in every table file, in the order found.
pub(super) struct Checker<'a> {
    sources: &'a [Source],
    pub(super) errors: Vec<Diagnostic>,
}

impl<'a> Checker<'a> {
    pub(super) fn new(sources: &'a [Source]) -> Checker<'a> {
        Checker {
            sources,
            errors: Vec::new(),
        }
    }

    /// The view of table file `file` (an index into `model::FILES`): the
    /// diagnostics its checks report name that file.
    pub(super) fn file(&mut self, file: usize) -> FileChecker<'_> {
        FileChecker {
            source: &self.sources[file],
            errors: &mut self.errors,
        }
    }
}

/// One table file's view of the [`Checker`]: each check gives a span and a
/// message, and the diagnostic names the file.
pub(super) struct FileChecker<'a> {
    source: &'a Source,
    errors: &'a mut Vec<Diagnostic>,
}

/// The keys of one kind seen so far in a file, each with the span where it
/// was first written: no key may be written twice.
pub(super) struct Seen {
    /// The kind, as messages name it: `duplicate WHAT "KEY"`.
    what: &'static str,
    first: HashMap<String, Range<usize>>,
}

impl Seen {
    pub(super) fn new(what: &'static str) -> Seen {
        Seen {
            what,
            first: HashMap::new(),
        }
    }
}

impl FileChecker<'_> {
    /// Reports a problem at the start of `span`.
    pub(super) fn err(&mut self, span: Range<usize>, msg: impl Into<String>) {
        self.errors.push(self.source.error(span, msg));
    }

    /// `LINE:COL` of a span of this file, for "first at" notes.
    pub(super) fn at(&self, span: &Range<usize>) -> String {
        self.source.at(span)
    }

    /// An integer that must lie in `lo..=hi`.
    pub(super) fn int(&mut self, v: &Spanned<i64>, what: &str, lo: i64, hi: i64) -> u32 {
        let x = *v.get_ref();
        if x < lo || x > hi {
            self.err(v.span(), format!("{what} is {x}, must be in {lo}..={hi}"));
            // The value as given (clamped to u32), so later rules judge it
            // as written instead of reporting a cascade of follow-on errors.
            return x.clamp(0, i64::from(u32::MAX)) as u32;
        }
        x as u32
    }

    /// A count in billions, in (0, 1e6), as a parameter count.
    pub(super) fn billions(&mut self, v: &Spanned<f64>, what: &str) -> u64 {
        let b = *v.get_ref();
        if !(b > 0.0 && b < 1.0e6) {
            self.err(v.span(), format!("{what} is {b}, must be in (0, 1000000)"));
            return 0;
        }
        (b * BILLION as f64).round() as u64
    }

    /// Records `key`, written at `span`; reports it when already seen.
    pub(super) fn unique(&mut self, seen: &mut Seen, key: String, span: Range<usize>) {
        if let Some(first) = seen.first.get(&key) {
            let at = self.at(first);
            self.err(
                span,
                format!("duplicate {} \"{key}\" (first at {at})", seen.what),
            );
        } else {
            seen.first.insert(key, span);
        }
    }

    /// A name that must be an identifier (lower-case ASCII letters, digits
    /// and '_', starting with a letter; messages call it `what`) and must not
    /// be in `seen` yet.
    pub(super) fn unique_identifier(&mut self, seen: &mut Seen, v: &Spanned<String>, what: &str) {
        let s = v.get_ref();
        let ok = s.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !ok {
            self.err(
                v.span(),
                format!("{what} \"{s}\" must be lower-case ASCII letters, digits and '_', starting with a letter"),
            );
        }
        self.unique(seen, s.clone(), v.span());
    }

    /// The index of `v` in `names`; reported (and 0) when it is not there.
    pub(super) fn lookup(&mut self, names: &[String], v: &Spanned<String>, what: &str) -> usize {
        match names.iter().position(|n| n == v.get_ref()) {
            Some(i) => i,
            None => {
                self.err(
                    v.span(),
                    format!(
                        "unknown {what} \"{}\" (known: {})",
                        v.get_ref(),
                        names.join(", ")
                    ),
                );
                0
            }
        }
    }
}
