//! Errors in the operator's TOML files (`--api-keys`, and the CLI's `--config`), told by line:
//! `LINE: message`, then the line quoted.

use std::ops::Range;

/// `message` about the bytes `at` of `text`, as `LINE: message` and the line itself (an empty
/// range: about the whole file, line 1, nothing quoted).
pub fn at_line(text: &str, at: Range<usize>, message: &str) -> String {
    let start = at.start.min(text.len());
    let line = text[..start].matches('\n').count() + 1;
    let quoted = text.lines().nth(line - 1).unwrap_or("").trim_end();
    if at.is_empty() || quoted.is_empty() {
        return format!("{line}: {message}");
    }
    format!("{line}: {message}\n    {line} | {quoted}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_quotes_the_line() {
        let text = "a = 1\nb = 2\n";
        assert_eq!(at_line(text, 6..7, "bad b"), "2: bad b\n    2 | b = 2");
        assert_eq!(at_line(text, 0..0, "empty"), "1: empty");
    }
}
