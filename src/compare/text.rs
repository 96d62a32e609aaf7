//! A bounded unified line diff for text bodies: enough for a person to see what changed, small
//! enough to store with every divergence record.

use super::myers;

/// At most this many diff lines are kept...
const MAX_LINES: usize = 100;
/// ...and at most this many bytes.
const MAX_BYTES: usize = 8 * 1024;
/// Unchanged lines shown around each change.
const CONTEXT: usize = 3;

const TRUNCATED: &str = "... diff truncated (over 100 lines or 8 KiB)\n";

/// A unified diff (`--- legacy` / `+++ new`) of two texts, cut at 100 lines or 8 KiB with a
/// `... diff truncated` line. Invalid UTF-8 is shown with replacement characters.
pub(super) fn unified(old: &[u8], new: &[u8]) -> String {
    let (old, new) = (String::from_utf8_lossy(old), String::from_utf8_lossy(new));
    let a: Vec<&str> = old.split_inclusive('\n').collect();
    let b: Vec<&str> = new.split_inclusive('\n').collect();
    let pairs = myers::align(
        a.len(),
        b.len(),
        myers::edit_budget(a.len(), b.len()),
        |i, j| a[i] == b[j],
    );

    // Runs of changed lines: (old range, new range).
    let mut runs = Vec::new();
    let (mut i, mut j) = (0, 0);
    for (pi, pj) in pairs.into_iter().chain([(a.len(), b.len())]) {
        if pi > i || pj > j {
            runs.push(((i, pi), (j, pj)));
        }
        (i, j) = (pi + 1, pj + 1);
    }

    let mut out = Out::default();
    out.raw("--- legacy\n+++ new\n");
    let mut r = 0;
    while r < runs.len() && !out.full {
        // A hunk takes the runs whose gaps are small enough to share context.
        let mut last = r;
        while last + 1 < runs.len() && runs[last + 1].0.0 - runs[last].0.1 <= 2 * CONTEXT {
            last += 1;
        }
        let ((first_old, _), (first_new, _)) = runs[r];
        let ((_, end_old), (_, end_new)) = runs[last];
        let before = first_old.min(first_new).min(CONTEXT);
        let after = (a.len() - end_old).min(b.len() - end_new).min(CONTEXT);
        let (old_start, new_start) = (first_old - before, first_new - before);
        let (old_len, new_len) = (end_old + after - old_start, end_new + after - new_start);
        out.raw(&format!(
            "@@ -{} +{} @@\n",
            range(old_start, old_len),
            range(new_start, new_len)
        ));
        let mut at = old_start;
        for &((o0, o1), (n0, n1)) in &runs[r..=last] {
            for line in &a[at..o0] {
                out.line(' ', line);
            }
            for line in &a[o0..o1] {
                out.line('-', line);
            }
            for line in &b[n0..n1] {
                out.line('+', line);
            }
            at = o1;
        }
        for line in &a[at..end_old + after] {
            out.line(' ', line);
        }
        r = last + 1;
    }
    if out.full {
        out.text.push_str(TRUNCATED);
    }
    out.text
}

/// `start,len` in unified diff form (1-based; an empty range names the line before it).
fn range(start: usize, len: usize) -> String {
    match len {
        0 => format!("{start},0"),
        1 => format!("{}", start + 1),
        _ => format!("{},{len}", start + 1),
    }
}

#[derive(Default)]
struct Out {
    text: String,
    lines: usize,
    full: bool,
}

impl Out {
    fn raw(&mut self, s: &str) {
        self.push(s);
    }

    fn line(&mut self, mark: char, line: &str) {
        let (body, newline) = match line.strip_suffix('\n') {
            Some(body) => (body, true),
            None => (line, false),
        };
        let mut s = String::with_capacity(body.len() + 2);
        s.push(mark);
        s.push_str(body);
        s.push('\n');
        self.push(&s);
        if !newline {
            self.push("\\ No newline at end of file\n");
        }
    }

    /// Appends whole lines while they fit; the first that does not fit is cut at a character
    /// boundary and ends the output.
    fn push(&mut self, s: &str) {
        for line in s.split_inclusive('\n') {
            if self.full {
                return;
            }
            let room = MAX_BYTES.saturating_sub(self.text.len() + TRUNCATED.len());
            if self.lines >= MAX_LINES || line.len() > room {
                let mut cut = room.min(line.len()).saturating_sub(1);
                while !line.is_char_boundary(cut) {
                    cut -= 1;
                }
                if self.lines < MAX_LINES && cut > 1 {
                    self.text.push_str(&line[..cut]);
                    self.text.push('\n');
                }
                self.full = true;
                return;
            }
            self.text.push_str(line);
            self.lines += 1;
        }
    }
}
