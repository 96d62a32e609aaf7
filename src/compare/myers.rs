//! Sequence alignment for JSON arrays and text lines: Myers' O((N+M)·D) greedy diff over an
//! equality predicate, with the common prefix and suffix trimmed first and the edit distance
//! capped, so a pair of unrelated long sequences costs a bounded amount of work.

/// The aligned (equal) pairs `(old, new)` between two sequences, in increasing order; what
/// lies between consecutive pairs is changed. When the part between the common prefix and
/// suffix needs more than `max_edits` insertions and deletions, that part is left unaligned
/// (all changed): a valid, if not minimal, alignment.
pub(crate) fn align(
    n: usize,
    m: usize,
    max_edits: usize,
    mut eq: impl FnMut(usize, usize) -> bool,
) -> Vec<(usize, usize)> {
    let mut pairs = Vec::new();
    let mut pre = 0;
    while pre < n && pre < m && eq(pre, pre) {
        pairs.push((pre, pre));
        pre += 1;
    }
    let mut suf = 0;
    while pre + suf < n && pre + suf < m && eq(n - 1 - suf, m - 1 - suf) {
        suf += 1;
    }
    let (mid_n, mid_m) = (n - pre - suf, m - pre - suf);
    if mid_n > 0
        && mid_m > 0
        && let Some(mid) = middle(mid_n, mid_m, max_edits, |x, y| eq(pre + x, pre + y))
    {
        pairs.extend(mid.into_iter().map(|(x, y)| (pre + x, pre + y)));
    }
    pairs.extend((0..suf).rev().map(|s| (n - 1 - s, m - 1 - s)));
    pairs
}

/// A reasonable edit cap for sequences of these lengths: generous for short ones, shrinking as
/// they grow so that the work (about `(n + m) * cap` comparisons, `cap²` memory) stays bounded.
pub(crate) fn edit_budget(n: usize, m: usize) -> usize {
    const WORK: usize = 2_000_000;
    (WORK / (n + m).max(1)).clamp(16, 512)
}

/// Myers' greedy forward algorithm with the `V` arrays kept for backtracking.
fn middle(
    n: usize,
    m: usize,
    max_edits: usize,
    mut eq: impl FnMut(usize, usize) -> bool,
) -> Option<Vec<(usize, usize)>> {
    // Sequence lengths come from in-memory slices, so they fit in isize.
    let (n_i, m_i) = (n as isize, m as isize);
    let max_d = max_edits.min(n + m);
    // v[k + offset] = furthest x reached on diagonal k (k = x - y).
    let offset = max_d as isize + 1;
    let mut v = vec![0isize; 2 * max_d + 3];
    // trace[d] = v as it was at the start of round d, for diagonals -(d+1)..=(d+1).
    let mut trace: Vec<Vec<isize>> = Vec::new();
    for d in 0..=max_d as isize {
        let lo = (offset - d - 1) as usize;
        let hi = (offset + d + 1) as usize;
        trace.push(v[lo..=hi].to_vec());
        let mut k = -d;
        while k <= d {
            let idx = (k + offset) as usize;
            let mut x = if k == -d || (k != d && v[idx - 1] < v[idx + 1]) {
                v[idx + 1]
            } else {
                v[idx - 1] + 1
            };
            let mut y = x - k;
            while x < n_i && y < m_i && eq(x as usize, y as usize) {
                x += 1;
                y += 1;
            }
            v[idx] = x;
            if x >= n_i && y >= m_i {
                return Some(backtrack(&trace, n_i, m_i));
            }
            k += 2;
        }
    }
    None
}

fn backtrack(trace: &[Vec<isize>], n: isize, m: isize) -> Vec<(usize, usize)> {
    let mut pairs = Vec::new();
    let (mut x, mut y) = (n, m);
    for (d, v) in trace.iter().enumerate().rev() {
        let d = d as isize;
        // In trace[d], diagonal k sits at index k + d + 1.
        let at = |k: isize| v[(k + d + 1) as usize];
        let k = x - y;
        let prev_k = if k == -d || (k != d && at(k - 1) < at(k + 1)) {
            k + 1
        } else {
            k - 1
        };
        let prev_x = at(prev_k);
        let prev_y = prev_x - prev_k;
        while x > prev_x && y > prev_y {
            x -= 1;
            y -= 1;
            pairs.push((x as usize, y as usize));
        }
        x = prev_x;
        y = prev_y;
    }
    pairs.reverse();
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lcs_len(a: &[u8], b: &[u8]) -> usize {
        let mut t = vec![vec![0usize; b.len() + 1]; a.len() + 1];
        for i in (0..a.len()).rev() {
            for j in (0..b.len()).rev() {
                t[i][j] = if a[i] == b[j] {
                    t[i + 1][j + 1] + 1
                } else {
                    t[i + 1][j].max(t[i][j + 1])
                };
            }
        }
        t[0][0]
    }

    #[test]
    fn insertion_in_the_middle_keeps_everything_else_aligned() {
        let a = b"abcd";
        let b = b"abXcd";
        let pairs = align(a.len(), b.len(), 10, |i, j| a[i] == b[j]);
        assert_eq!(pairs, vec![(0, 0), (1, 1), (2, 3), (3, 4)]);
    }

    #[test]
    fn over_budget_keeps_prefix_and_suffix_only() {
        let a = b"xabababy";
        let b = b"xbababay";
        assert_eq!(
            align(a.len(), b.len(), 1, |i, j| a[i] == b[j]),
            vec![(0, 0), (7, 7)]
        );
        assert_eq!(align(a.len(), b.len(), 16, |i, j| a[i] == b[j]).len(), 7);
        // Pure insertions need no search, whatever the budget.
        assert_eq!(align(2, 40, 1, |i, j| i == j), vec![(0, 0), (1, 1)]);
    }

    proptest! {
        #[test]
        fn alignment_is_a_longest_common_subsequence(
            a in proptest::collection::vec(0u8..4, 0..24),
            b in proptest::collection::vec(0u8..4, 0..24),
        ) {
            let pairs = align(a.len(), b.len(), 64, |i, j| a[i] == b[j]);
            for w in pairs.windows(2) {
                prop_assert!(w[0].0 < w[1].0 && w[0].1 < w[1].1);
            }
            for &(i, j) in &pairs {
                prop_assert_eq!(a[i], b[j]);
            }
            prop_assert_eq!(pairs.len(), lcs_len(&a, &b));
        }
    }
}
