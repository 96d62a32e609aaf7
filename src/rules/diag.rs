//! Diagnostics for rule files: every problem carries `file:line:col`, a message and a hint, so
//! that `ficus rules check` and the reload log tell a migration team exactly what to fix.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Whether a diagnostic rejects the rules or only points at something suspicious.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// A position in a rules file, 1-based like editors and compilers show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: Arc<Path>,
    pub line: usize,
    pub col: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.col)
    }
}

/// One problem found in the rules.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub severity: Severity,
    pub location: Location,
    pub message: String,
    pub hint: Option<String>,
}

impl Diagnostic {
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// `FILE:LINE:COL: error: message; hint: ...`, one line per diagnostic so that it greps well.
impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{}: {severity}: {}", self.location, self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "; hint: {hint}")?;
        }
        Ok(())
    }
}

/// Maps byte offsets of one source file to line and column.
pub(crate) struct SourceMap {
    file: Arc<Path>,
    line_starts: Vec<usize>,
    text_len: usize,
    text: Arc<str>,
}

impl SourceMap {
    pub(crate) fn new(file: &Path, text: &str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Self {
            file: Arc::from(file),
            line_starts,
            text_len: text.len(),
            text: Arc::from(text),
        }
    }

    /// Location of the start of `span` (columns count characters, not bytes).
    pub(crate) fn locate(&self, span: &Range<usize>) -> Location {
        let offset = span.start.min(self.text_len);
        let line = self.line_starts.partition_point(|&s| s <= offset).max(1);
        let start = self.line_starts[line - 1];
        let col = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count())
            + 1;
        Location {
            file: self.file.clone(),
            line,
            col,
        }
    }

    pub(crate) fn error(
        &self,
        span: &Range<usize>,
        message: impl Into<String>,
        hint: Option<String>,
    ) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            location: self.locate(span),
            message: message.into(),
            hint,
        }
    }
}

/// A location for problems that concern a whole file or path (unreadable, no rules found).
pub(crate) fn file_location(path: &Path) -> Location {
    Location {
        file: Arc::from(PathBuf::from(path).as_path()),
        line: 1,
        col: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_lines_and_columns() {
        let map = SourceMap::new(Path::new("r.toml"), "a = 1\nbé = 2\n");
        assert_eq!(map.locate(&(0..1)).line, 1);
        let loc = map.locate(&(6..7));
        assert_eq!((loc.line, loc.col), (2, 1));
        // 'é' is two bytes but one column.
        let loc = map.locate(&(10..11));
        assert_eq!((loc.line, loc.col), (2, 4));
        assert_eq!(loc.to_string(), "r.toml:2:4");
    }
}
