//! How the command-line programs report an error.

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

/// A library error and its causes (its `source()` chain), `: `-separated:
/// how a message is written where there is no `anyhow::Error`.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut message = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        message.push_str(": ");
        message.push_str(&c.to_string());
        cause = c.source();
    }
    message
}
