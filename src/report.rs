//! How the command-line programs report an error.

use std::error::Error;

/// The error and its causes, `: `-separated, each said once: library errors
/// that already quote their cause are not followed by it again.
///
/// ```
/// let io = std::io::Error::other("disk full");
/// let err = anyhow::Error::new(io).context("cannot write runs/default/metrics.jsonl");
/// assert_eq!(
///     qlora_scale::report::error_message(&err),
///     "cannot write runs/default/metrics.jsonl: disk full"
/// );
/// ```
pub fn error_message(err: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
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
