//! The loss curve as a small hand-written SVG: training loss as a line,
//! validation loss as dots, axes with min/max labels.
//!
//! ```
//! use qlora_scale::train::plot::loss_svg;
//! let svg = loss_svg(&[(1, 5.0), (2, 4.0), (3, 3.5)], &[(2, 4.2)]);
//! assert!(svg.starts_with("<svg") && svg.contains("polyline"));
//! ```

use std::fmt::Write;

/// An SVG of `train` (step, loss) as a line and `valid` (step, loss) as
/// dots. Non-finite values are left out.
pub fn loss_svg(train: &[(u64, f64)], valid: &[(u64, f64)]) -> String {
    let (w, h, pad) = (720.0, 400.0, 56.0);
    let pts = || {
        train
            .iter()
            .chain(valid)
            .filter(|(_, l)| l.is_finite())
            .copied()
    };
    let max_step = pts().map(|(s, _)| s).max().unwrap_or(1).max(1) as f64;
    let min_step = pts().map(|(s, _)| s).min().unwrap_or(0) as f64;
    let lo = pts().map(|(_, l)| l).fold(f64::INFINITY, f64::min);
    let hi = pts().map(|(_, l)| l).fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo.is_finite() && hi > lo {
        (lo, hi)
    } else if lo.is_finite() {
        (lo - 0.5, lo + 0.5)
    } else {
        (0.0, 1.0)
    };
    let x = |s: u64| pad + (s as f64 - min_step) / (max_step - min_step).max(1.0) * (w - 2.0 * pad);
    let y = |l: f64| h - pad - (l - lo) / (hi - lo) * (h - 2.0 * pad);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<path d="M{pad} {pad} V{} H{}" stroke="black" fill="none"/>"#,
        h - pad,
        w - pad
    );
    let _ = writeln!(
        out,
        r#"<text x="{}" y="20" text-anchor="middle">loss by optimizer step</text>"#,
        w / 2.0
    );
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="end">{hi:.3}</text>"#,
        pad - 4.0,
        pad + 4.0
    );
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="end">{lo:.3}</text>"#,
        pad - 4.0,
        h - pad
    );
    let _ = writeln!(
        out,
        r#"<text x="{pad}" y="{}" text-anchor="middle">{min_step}</text>"#,
        h - pad + 18.0
    );
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">{max_step}</text>"#,
        w - pad,
        h - pad + 18.0
    );
    let line: Vec<String> = train
        .iter()
        .filter(|(_, l)| l.is_finite())
        .map(|&(s, l)| format!("{:.1},{:.1}", x(s), y(l)))
        .collect();
    let _ = writeln!(
        out,
        r##"<polyline points="{}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>"##,
        line.join(" ")
    );
    for &(s, l) in valid.iter().filter(|(_, l)| l.is_finite()) {
        let _ = writeln!(
            out,
            r##"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="#d62728"/>"##,
            x(s),
            y(l)
        );
    }
    let _ = writeln!(
        out,
        r##"<text x="{}" y="{}" fill="#1f77b4">train</text>"##,
        w - pad - 90.0,
        pad + 4.0
    );
    let _ = writeln!(
        out,
        r##"<text x="{}" y="{}" fill="#d62728">validation</text>"##,
        w - pad - 90.0,
        pad + 20.0
    );
    out.push_str("</svg>\n");
    out
}
