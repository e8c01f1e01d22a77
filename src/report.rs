//! How the command-line programs report an error.
//!
//! Every error here follows one rule: its message says what failed, and its
//! cause, if any, is its `source()`, never quoted in the message as well. So
//! the full story is the chain, read outermost first.

use std::error::Error;

/// The error and its causes, outermost first, `: `-separated.
///
/// ```
/// use qlora_scale::files::FilesError;
///
/// let io = std::io::Error::other("disk full");
/// let err = anyhow::Error::new(io).context("cannot write runs/default/metrics.jsonl");
/// assert_eq!(
///     qlora_scale::report::error_message(&err),
///     "cannot write runs/default/metrics.jsonl: disk full"
/// );
///
/// // A library error's message names what failed; its source says why.
/// let err = FilesError::Io {
///     path: "models/tiny/config.json".into(),
///     source: std::io::Error::other("permission denied"),
/// };
/// let err = anyhow::Error::new(err).context("cannot size the model");
/// assert_eq!(
///     qlora_scale::report::error_message(&err),
///     "cannot size the model: models/tiny/config.json: permission denied"
/// );
/// ```
pub fn error_message(err: &anyhow::Error) -> String {
    let causes: Vec<String> = err.chain().map(ToString::to_string).collect();
    causes.join(": ")
}

/// [`error_message`] for an error that is not an [`anyhow::Error`]: its
/// message, then each `source()`'s, `: `-separated.
///
/// ```
/// use qlora_scale::files::{ConfigError, FilesError, config_param_count_str};
///
/// let source = config_param_count_str("{").unwrap_err();
/// assert!(matches!(source, ConfigError::Json(_)));
/// let err = FilesError::Config { path: "config.json".into(), source };
/// assert_eq!(err.to_string(), "config.json");
/// assert_eq!(
///     qlora_scale::report::chain_message(&err),
///     "config.json: not valid JSON: EOF while parsing an object at line 1 column 1"
/// );
/// ```
pub fn chain_message(err: &(dyn Error + 'static)) -> String {
    let mut message = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        message.push_str(": ");
        message.push_str(&e.to_string());
        cause = e.source();
    }
    message
}
