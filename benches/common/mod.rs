//! Statistics shared by the benchmarks (included with `mod common;`): the
//! median of several rounds with their spread, formatted for the tables.

#![allow(dead_code)]

/// Median, min and max.
pub fn summary(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let med = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    (med, s[0], s[n - 1])
}

/// "median [min–max]", or just the median when every round agreed.
pub fn cell(v: &[f64], prec: usize) -> String {
    let (m, lo, hi) = summary(v);
    if (hi - lo).abs() < f64::EPSILON {
        format!("{m:.prec$}")
    } else {
        format!("{m:.prec$} [{lo:.prec$}–{hi:.prec$}]")
    }
}
