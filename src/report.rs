//! The readiness verdict: from a route's measured evidence (comparisons, divergences, records
//! classified as expected or as defects) and its gate, whether the new side may take
//! authority. Pure functions, so the logic is tested on crafted evidence.

use serde::Serialize;

use crate::rules::Gate;

/// z for a two-sided 95% interval.
const Z95: f64 = 1.959_963_984_540_054;

/// Upper bound of the Wilson score interval (95%) for `x` successes out of `n`.
pub fn wilson_upper(x: u64, n: u64) -> f64 {
    if n == 0 {
        return 1.0;
    }
    let (x, n) = (x.min(n) as f64, n as f64);
    let p = x / n;
    let z2 = Z95 * Z95;
    let centre = p + z2 / (2.0 * n);
    let spread = Z95 * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre + spread) / (1.0 + z2 / n)).min(1.0)
}

/// What the verdict is computed from, over the gate's window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Evidence {
    /// Comparisons in the window.
    pub comparisons: u64,
    /// Diverged comparisons in the window (noisy fields already excluded).
    pub divergences: u64,
    /// Records in the window that people marked `expected`: intended differences.
    pub expected: u64,
    /// Records classified `defect` that are open or acknowledged (kept by retention): each
    /// one blocks.
    pub open_defects: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// `ready`, `not-ready` or `insufficient-data`.
    pub verdict: &'static str,
    pub reasons: Vec<String>,
    /// Divergences counted against the gate, over comparisons.
    pub divergence_rate: f64,
    /// The Wilson 95% upper bound of that rate: what the gate compares.
    pub divergence_rate_upper_95: f64,
}

pub fn verdict(e: &Evidence, gate: &Gate) -> Verdict {
    let counted = e.divergences.saturating_sub(e.expected);
    let rate = if e.comparisons == 0 {
        0.0
    } else {
        counted as f64 / e.comparisons as f64
    };
    let upper = wilson_upper(counted, e.comparisons);
    let mut reasons = Vec::new();
    let mut verdict = "ready";
    // No comparison is no evidence, whatever the gate asks (`min_samples = 0`): the bound
    // of 0 of 0 is 1, which a gate of `max_divergence_rate = 1` would let through.
    if e.comparisons == 0 || e.comparisons < gate.min_samples {
        verdict = "insufficient-data";
        reasons.push(format!(
            "{} comparisons in the window, the gate needs {}",
            e.comparisons,
            gate.min_samples.max(1)
        ));
    }
    if e.open_defects > 0 {
        verdict = "not-ready";
        reasons.push(format!(
            "{} unresolved divergence(s) classified as defect",
            e.open_defects
        ));
    }
    if e.comparisons > 0 && e.comparisons >= gate.min_samples && upper > gate.max_divergence_rate {
        verdict = "not-ready";
        reasons.push(format!(
            "divergence rate {:.4}% (95% upper bound {:.4}%) is above the gate's {:.4}%",
            rate * 100.0,
            upper * 100.0,
            gate.max_divergence_rate * 100.0
        ));
    }
    if verdict == "ready" {
        reasons.push(format!(
            "{} comparisons, divergence rate 95% upper bound {:.4}% within {:.4}%, no unresolved defect",
            e.comparisons,
            upper * 100.0,
            gate.max_divergence_rate * 100.0
        ));
    }
    Verdict {
        verdict,
        reasons,
        divergence_rate: rate,
        divergence_rate_upper_95: upper,
    }
}

/// One hour of a route's divergence chart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Hour {
    /// The hour's start, Unix ms.
    pub hour_ms: u64,
    pub comparisons: u64,
    pub divergences: u64,
    /// Records of that hour that people marked `expected`.
    pub expected: u64,
    /// Divergences counted against the gate, as in the verdict: `divergences - expected`.
    pub counted: u64,
}

/// A route's hourly counters (Unix hour, counts) joined with the times (Unix ms) of its
/// records marked `expected`, so that the chart subtracts them hour by hour as the verdict does
/// over the window. Expected records of an hour without counters are left out with it.
pub fn hours(counts: &[(u64, crate::store::Counts)], expected_at_ms: &[u64]) -> Vec<Hour> {
    let mut expected: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    for &at in expected_at_ms {
        *expected.entry(crate::store::hour_of(at)).or_default() += 1;
    }
    counts
        .iter()
        .map(|&(hour, c)| {
            let expected = expected.get(&hour).copied().unwrap_or(0);
            Hour {
                hour_ms: hour * 3_600_000,
                comparisons: c.comparisons,
                divergences: c.divergences,
                expected,
                counted: c.divergences.saturating_sub(expected),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_subtracts_expected_records_in_their_own_hour() {
        let counts = |comparisons, divergences| crate::store::Counts {
            comparisons,
            divergences,
        };
        let (h1, h2) = (480_000, 480_001);
        let ms = |hour: u64, min: u64| hour * 3_600_000 + min * 60_000;
        // Two expected in the first hour, one in an hour with no counters (left out), and more
        // expected than divergences in the second (counted never goes below zero).
        let expected = [ms(h1, 5), ms(h1, 59), ms(h1 - 3, 0), ms(h2, 1), ms(h2, 2)];
        let got = hours(&[(h1, counts(10, 3)), (h2, counts(4, 1))], &expected);
        assert_eq!(
            got.iter()
                .map(|h| (h.hour_ms, h.expected, h.counted))
                .collect::<Vec<_>>(),
            [(ms(h1, 0), 2, 1), (ms(h2, 0), 2, 0)]
        );
        assert_eq!((got[0].comparisons, got[0].divergences), (10, 3));
    }

    fn gate() -> Gate {
        Gate::default()
    }

    #[test]
    fn wilson_upper_bound_matches_known_values() {
        for (x, n, want) in [
            (0, 1000, 0.003_826_758),
            (5, 100, 0.111_750_469),
            (1, 2000, 0.002_826_863),
            (30, 1000, 0.042_503_414),
        ] {
            assert!((wilson_upper(x, n) - want).abs() < 1e-8, "{x}/{n}");
        }
        assert_eq!(wilson_upper(0, 0), 1.0);
    }

    #[test]
    fn too_few_comparisons_is_insufficient_data() {
        let v = verdict(
            &Evidence {
                comparisons: 999,
                ..Default::default()
            },
            &gate(),
        );
        assert_eq!(v.verdict, "insufficient-data");
    }

    /// A gate without a minimum (`min_samples = 0`) still needs one comparison: with none,
    /// nothing was measured, and a permissive rate must not read as ready.
    #[test]
    fn no_comparison_is_never_ready() {
        for max_divergence_rate in [1.0, 0.5, 0.001] {
            let gate = Gate {
                min_samples: 0,
                max_divergence_rate,
                ..Gate::default()
            };
            let v = verdict(&Evidence::default(), &gate);
            assert_eq!(
                v.verdict, "insufficient-data",
                "{max_divergence_rate}: {v:?}"
            );
        }
    }

    #[test]
    fn a_clean_route_with_enough_evidence_is_ready() {
        // 0 of 5,000: upper bound 0.077% < 0.1%.
        let v = verdict(
            &Evidence {
                comparisons: 5000,
                ..Default::default()
            },
            &gate(),
        );
        assert_eq!(v.verdict, "ready", "{v:?}");
        // 0 of 1,000: upper bound 0.38% > 0.1%: not ready yet, although nothing diverged.
        let v = verdict(
            &Evidence {
                comparisons: 1000,
                ..Default::default()
            },
            &gate(),
        );
        assert_eq!(v.verdict, "not-ready", "{v:?}");
    }

    #[test]
    fn expected_records_do_not_count_and_defects_block() {
        let e = Evidence {
            comparisons: 10_000,
            divergences: 50,
            expected: 50,
            open_defects: 0,
        };
        assert_eq!(verdict(&e, &gate()).verdict, "ready");
        let e = Evidence {
            comparisons: 10_000,
            divergences: 50,
            expected: 0,
            open_defects: 0,
        };
        assert_eq!(verdict(&e, &gate()).verdict, "not-ready");
        let e = Evidence {
            comparisons: 10_000,
            divergences: 0,
            expected: 0,
            open_defects: 1,
        };
        let v = verdict(&e, &gate());
        assert_eq!(v.verdict, "not-ready");
        assert!(v.reasons[0].contains("defect"));
    }
}
