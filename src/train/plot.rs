//! The loss plot, `loss.svg`, drawn from a run's [`StepLog`]s (the rows of
//! `metrics.jsonl`): a loss panel with the training loss as a line and the
//! validation loss as dots on a dashed line, and under it a small panel of
//! the learning rate, on the same step axis. Both panels have titled axes,
//! "nice" labelled ticks (1, 2 or 5 times a power of ten), a grid and, for
//! the loss, a legend.
//!
//! Plain SVG 1.1: presentation attributes only (no CSS, no external fonts,
//! no scripts), every text escaped, so a browser and `rsvg-convert` render
//! it alike. About `[trainer] plot_ticks` ticks are labelled on each axis
//! and each series is thinned to at most `[trainer] plot_max_points`
//! points (`tables/defaults.toml`).
//!
//! ```
//! use qlora_scale::train::plot::loss_svg;
//! use qlora_scale::train::trainer::StepLog;
//! let row = |step, loss, val_loss| StepLog {
//!     step, loss, lr: 1e-3, grad_norm: 1.0, tokens: 64, tokens_per_s: 100.0,
//!     peak_rss_mib: 50.0, peak_gpu_mib: None, allreduce_ms: 0.0, val_loss, time: None, elapsed_s: 0.0,
//! };
//! let svg = loss_svg("demo", &[row(1, 5.0, None), row(2, 4.0, Some(4.2)), row(3, 3.5, None)]);
//! assert!(svg.starts_with("<?xml") && svg.contains("<polyline"));
//! ```

use std::fmt::Write;

use super::trainer::StepLog;
use crate::tables::trainer::{PLOT_MAX_POINTS, PLOT_TICKS};

/// Canvas size, px.
const WIDTH: f64 = 800.0;
const HEIGHT: f64 = 600.0;
/// Space left of the panels (tick labels and the rotated axis title), px.
const MARGIN_LEFT: f64 = 84.0;
/// Space right of the panels, px.
const MARGIN_RIGHT: f64 = 24.0;
/// Space above the loss panel (the plot's title), px.
const MARGIN_TOP: f64 = 44.0;
/// Space under the learning-rate panel (tick labels and the step axis title), px.
const MARGIN_BOTTOM: f64 = 56.0;
/// Space between the two panels (the loss panel's step labels), px.
const PANEL_GAP: f64 = 40.0;
/// Height of the learning-rate panel, px; the loss panel takes the rest.
const LR_PANEL_HEIGHT: f64 = 120.0;
/// Length of a tick mark, px.
const TICK_LEN: f64 = 5.0;
/// Gap between a tick mark and its label, px.
const LABEL_GAP: f64 = 3.0;
/// Font sizes, px.
const FONT_SIZE: f64 = 12.0;
const TITLE_FONT_SIZE: f64 = 15.0;
/// Distance from a panel's left edge to the centre of its rotated y title, px.
const Y_TITLE_OFFSET: f64 = 64.0;
/// Legend: its inset from the panel's top-right corner, a row's height,
/// the sample line's length, px.
const LEGEND_INSET: f64 = 12.0;
const LEGEND_ROW: f64 = 18.0;
const LEGEND_SAMPLE: f64 = 24.0;
/// Room the legend leaves for its longest name, px.
const LEGEND_TEXT_WIDTH: f64 = 72.0;
/// Distance from the lower panel's bottom edge to the step axis title's
/// baseline, px (under the tick labels).
const X_TITLE_OFFSET: f64 = 38.0;
/// How far below its anchor a text's baseline goes so that the text looks
/// centred on it, as a share of the font size (no `dominant-baseline`:
/// renderers differ on it).
const BASELINE_SHIFT: f64 = 1.0 / 3.0;
/// Radius of a validation dot, px.
const DOT_RADIUS: f64 = 3.5;
/// Series and frame styles.
const TRAIN_COLOR: &str = "#1f77b4";
const VALID_COLOR: &str = "#d62728";
const LR_COLOR: &str = "#2ca02c";
const GRID_COLOR: &str = "#dddddd";
const AXIS_COLOR: &str = "#333333";
const SERIES_WIDTH: f64 = 1.5;
const VALID_DASH: &str = "5,3";
/// Generic families only: nothing to download, and every renderer has one.
const FONT_FAMILY: &str = "DejaVu Sans, Arial, Helvetica, sans-serif";
/// Axes whose largest tick is below this (or at least [`SCALE_ABOVE`]) are
/// labelled in units of a power of ten, named in the axis title.
const SCALE_BELOW: f64 = 1e-2;
const SCALE_ABOVE: f64 = 1e5;
/// A range of one value is widened by this share of the value, each way.
const SINGLE_VALUE_MARGIN: f64 = 0.1;
/// The mantissas of tick steps.
const NICE_STEPS: [f64; 4] = [1.0, 2.0, 5.0, 10.0];
/// The fewest ticks an axis gets (the small learning-rate panel too).
const MIN_TICKS: u64 = 3;
/// Relative slack for rounding in the tick arithmetic.
const EPSILON: f64 = 1e-9;

/// `text` with the characters XML gives a meaning escaped.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters are not allowed in XML 1.0 text.
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// One axis: its range, widened to whole ticks, and its tick spacing.
#[derive(Clone, Debug, PartialEq)]
pub struct Axis {
    /// Lowest value shown (a tick).
    pub lo: f64,
    /// Highest value shown (a tick).
    pub hi: f64,
    /// Distance between ticks: 1, 2 or 5 times a power of ten.
    pub step: f64,
    /// Labels are in units of `10^exp` (0: plain numbers).
    pub exp: i32,
}

impl Axis {
    /// An axis over `lo..=hi` with about `target` ticks at "nice" values;
    /// a range of one value is widened around it, a non-finite one is `0..=1`.
    pub fn nice(lo: f64, hi: f64, target: u64) -> Axis {
        let (lo, hi) = match (lo.is_finite() && hi.is_finite(), hi > lo) {
            (false, _) => (0.0, 1.0),
            (true, true) => (lo, hi),
            (true, false) if lo == 0.0 => (0.0, 1.0),
            (true, false) => (
                lo - lo.abs() * SINGLE_VALUE_MARGIN,
                hi + hi.abs() * SINGLE_VALUE_MARGIN,
            ),
        };
        let rough = (hi - lo) / target.saturating_sub(1).max(1) as f64;
        let mag = 10f64.powf(rough.log10().floor());
        let step = NICE_STEPS
            .into_iter()
            .map(|m| m * mag)
            .find(|s| *s >= rough * (1.0 - EPSILON))
            .unwrap_or(10.0 * mag);
        let (lo, hi) = ((lo / step).floor() * step, (hi / step).ceil() * step);
        let top = lo.abs().max(hi.abs());
        let exp = if top > 0.0 && !(SCALE_BELOW..SCALE_ABOVE).contains(&top) {
            top.log10().floor() as i32
        } else {
            0
        };
        Axis { lo, hi, step, exp }
    }

    /// The optimizer-step axis: ticks at whole numbers, starting at a tick
    /// but ending at the last step (a long run would otherwise leave up to
    /// a fifth of the width empty).
    pub fn steps(lo: f64, hi: f64, target: u64) -> Axis {
        let mut axis = Axis::nice(lo, hi, target);
        if axis.step < 1.0 {
            axis = Axis {
                lo: axis.lo.floor(),
                hi: axis.hi.ceil(),
                step: 1.0,
                exp: 0,
            };
        }
        if hi.is_finite() && hi > lo && hi > axis.lo {
            axis.hi = hi;
        }
        axis
    }

    /// The tick values: multiples of the step from `lo` up to `hi`.
    pub fn ticks(&self) -> Vec<f64> {
        let n = ((self.hi - self.lo) / self.step + EPSILON).floor().max(0.0) as u64;
        (0..=n).map(|i| self.lo + i as f64 * self.step).collect()
    }

    /// A tick's label: as many decimals as the step needs, in units of
    /// `10^exp`.
    pub fn label(&self, v: f64) -> String {
        let unit = 10f64.powi(self.exp);
        let step = self.step / unit;
        let decimals = (-step.log10() - EPSILON).ceil().max(0.0) as usize;
        let v = v / unit;
        // No "-0".
        let v = if v.abs() < step * EPSILON { 0.0 } else { v };
        format!("{v:.decimals$}")
    }

    /// What the axis title adds for the unit: ` (x 1e-3)`, or nothing.
    pub fn unit_suffix(&self) -> String {
        match self.exp {
            0 => String::new(),
            e => format!(" (x 1e{e})"),
        }
    }
}

/// A panel: its place on the canvas and its two axes.
struct Panel {
    left: f64,
    top: f64,
    width: f64,
    height: f64,
    x: Axis,
    y: Axis,
}

impl Panel {
    fn px(&self, v: f64) -> f64 {
        self.left + (v - self.x.lo) / (self.x.hi - self.x.lo) * self.width
    }

    fn py(&self, v: f64) -> f64 {
        self.top + self.height - (v - self.y.lo) / (self.y.hi - self.y.lo) * self.height
    }

    fn bottom(&self) -> f64 {
        self.top + self.height
    }

    /// The grid, the frame, the ticks with their labels, and the y axis
    /// title (rotated); the x axis title too when `x_title` is given. Each
    /// part is a group with an `id` prefixed by `name`.
    fn draw_frame(&self, out: &mut String, name: &str, y_title: &str, x_title: Option<&str>) {
        let (xt, yt) = (self.x.ticks(), self.y.ticks());
        let _ = writeln!(
            out,
            r#"<g id="{name}-grid" stroke="{GRID_COLOR}" stroke-width="1">"#
        );
        for &v in &xt {
            let x = self.px(v);
            line(out, (x, self.top), (x, self.bottom()));
        }
        for &v in &yt {
            let y = self.py(v);
            line(out, (self.left, y), (self.left + self.width, y));
        }
        out.push_str("</g>\n");
        let _ = writeln!(
            out,
            r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="{AXIS_COLOR}"/>"#,
            self.left, self.top, self.width, self.height
        );
        self.draw_x_ticks(out, name, &xt);
        self.draw_y_ticks(out, name, &yt);
        let (cx, cy) = (self.left - Y_TITLE_OFFSET, self.top + self.height / 2.0);
        let _ = writeln!(
            out,
            r#"<text id="{name}-y-title" x="{cx:.1}" y="{cy:.1}" text-anchor="middle" transform="rotate(-90 {cx:.1} {cy:.1})">{}{}</text>"#,
            escape(y_title),
            self.y.unit_suffix()
        );
        if let Some(title) = x_title {
            let _ = writeln!(
                out,
                r#"<text id="{name}-x-title" x="{:.1}" y="{:.1}" text-anchor="middle">{}{}</text>"#,
                self.left + self.width / 2.0,
                self.bottom() + X_TITLE_OFFSET,
                escape(title),
                self.x.unit_suffix()
            );
        }
    }

    fn draw_x_ticks(&self, out: &mut String, name: &str, ticks: &[f64]) {
        let _ = writeln!(
            out,
            r#"<g id="{name}-x-ticks" stroke="{AXIS_COLOR}" text-anchor="middle">"#
        );
        for &v in ticks {
            let x = self.px(v);
            line(out, (x, self.bottom()), (x, self.bottom() + TICK_LEN));
            let y = self.bottom() + TICK_LEN + LABEL_GAP + FONT_SIZE;
            let _ = writeln!(
                out,
                r#"<text x="{x:.1}" y="{y:.1}" stroke="none">{}</text>"#,
                self.x.label(v)
            );
        }
        out.push_str("</g>\n");
    }

    fn draw_y_ticks(&self, out: &mut String, name: &str, ticks: &[f64]) {
        let _ = writeln!(
            out,
            r#"<g id="{name}-y-ticks" stroke="{AXIS_COLOR}" text-anchor="end">"#
        );
        for &v in ticks {
            let y = self.py(v);
            line(out, (self.left - TICK_LEN, y), (self.left, y));
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}" stroke="none">{}</text>"#,
                self.left - TICK_LEN - LABEL_GAP,
                y + FONT_SIZE * BASELINE_SHIFT,
                self.y.label(v)
            );
        }
        out.push_str("</g>\n");
    }

    /// `points` as a polyline, `dash` its dash pattern.
    fn draw_line(
        &self,
        out: &mut String,
        id: &str,
        points: &[(f64, f64)],
        color: &str,
        dash: Option<&str>,
    ) {
        let coords: Vec<String> = points
            .iter()
            .map(|&(s, v)| format!("{:.1},{:.1}", self.px(s), self.py(v)))
            .collect();
        let dash = dash
            .map(|d| format!(r#" stroke-dasharray="{d}""#))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            r#"<polyline id="{id}" points="{}" fill="none" stroke="{color}" stroke-width="{SERIES_WIDTH}"{dash}/>"#,
            coords.join(" ")
        );
    }

    fn draw_dots(&self, out: &mut String, id: &str, points: &[(f64, f64)], color: &str) {
        let _ = writeln!(out, r#"<g id="{id}" fill="{color}">"#);
        for &(s, v) in points {
            let _ = writeln!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="{DOT_RADIUS}"/>"#,
                self.px(s),
                self.py(v)
            );
        }
        out.push_str("</g>\n");
    }

    /// The legend in the panel's top-right corner: one row per series, a
    /// sample of its line (and dot) and its name.
    fn draw_legend(&self, out: &mut String, entries: &[(&str, &str, Option<&str>, bool)]) {
        out.push_str("<g id=\"legend\">\n");
        let text_x = self.left + self.width - LEGEND_INSET - LEGEND_TEXT_WIDTH;
        for (i, &(label, color, dash, dot)) in entries.iter().enumerate() {
            let y = self.top + LEGEND_INSET + LEGEND_ROW * (i as f64 + 0.5);
            let x0 = text_x - LABEL_GAP - LEGEND_SAMPLE;
            let dash = dash
                .map(|d| format!(r#" stroke-dasharray="{d}""#))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                r#"<line x1="{x0:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{color}" stroke-width="{SERIES_WIDTH}"{dash}/>"#,
                x0 + LEGEND_SAMPLE
            );
            if dot {
                let _ = writeln!(
                    out,
                    r#"<circle cx="{:.1}" cy="{y:.1}" r="{DOT_RADIUS}" fill="{color}"/>"#,
                    x0 + LEGEND_SAMPLE / 2.0
                );
            }
            let _ = writeln!(
                out,
                r#"<text x="{text_x:.1}" y="{:.1}">{}</text>"#,
                y + FONT_SIZE * BASELINE_SHIFT,
                escape(label)
            );
        }
        out.push_str("</g>\n");
    }
}

fn line(out: &mut String, (x1, y1): (f64, f64), (x2, y2): (f64, f64)) {
    let _ = writeln!(
        out,
        r#"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}"/>"#
    );
}

/// At most `max` of `points`, evenly strided, the last one always kept.
fn thin(points: Vec<(f64, f64)>, max: usize) -> Vec<(f64, f64)> {
    if points.len() <= max.max(2) {
        return points;
    }
    let stride = points.len().div_ceil(max.max(2) - 1);
    let last = points.last().copied();
    let mut kept: Vec<(f64, f64)> = points.into_iter().step_by(stride).collect();
    if kept.last().copied() != last {
        kept.extend(last);
    }
    kept
}

/// The lowest and highest value of every series together.
fn extent<'a>(
    series: impl IntoIterator<Item = &'a [(f64, f64)]>,
    pick: fn(&(f64, f64)) -> f64,
) -> (f64, f64) {
    series
        .into_iter()
        .flatten()
        .map(pick)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        })
}

/// The three series of a run, finite values only, thinned.
struct Series {
    train: Vec<(f64, f64)>,
    valid: Vec<(f64, f64)>,
    lr: Vec<(f64, f64)>,
}

impl Series {
    fn of(logs: &[StepLog]) -> Series {
        let max = PLOT_MAX_POINTS as usize;
        let finite = |f: fn(&StepLog) -> Option<f64>| {
            let pts = logs
                .iter()
                .filter_map(|l| Some((l.step as f64, f(l)?)))
                .filter(|(_, v)| v.is_finite())
                .collect();
            thin(pts, max)
        };
        Series {
            train: finite(|l| Some(l.loss)),
            valid: finite(|l| l.val_loss),
            lr: finite(|l| Some(l.lr)),
        }
    }
}

/// The SVG document of a run's loss plot, titled `title`, from its steps
/// in order. Non-finite values are left out; with no steps the axes are
/// drawn empty.
pub fn loss_svg(title: &str, logs: &[StepLog]) -> String {
    let s = Series::of(logs);
    let all = [&s.train[..], &s.valid[..], &s.lr[..]];
    let (step_lo, step_hi) = extent(all, |p| p.0);
    let x = Axis::steps(step_lo.min(step_hi), step_hi, PLOT_TICKS);
    let (loss_lo, loss_hi) = extent([&s.train[..], &s.valid[..]], |p| p.1);
    let (lr_lo, lr_hi) = extent([&s.lr[..]], |p| p.1);
    let width = WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
    let loss_height = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM - PANEL_GAP - LR_PANEL_HEIGHT;
    let loss = Panel {
        left: MARGIN_LEFT,
        top: MARGIN_TOP,
        width,
        height: loss_height,
        x: x.clone(),
        y: Axis::nice(loss_lo, loss_hi, PLOT_TICKS),
    };
    let lr = Panel {
        left: MARGIN_LEFT,
        top: MARGIN_TOP + loss_height + PANEL_GAP,
        width,
        height: LR_PANEL_HEIGHT,
        x,
        // From 0 (warmup starts there); a small panel, so fewer ticks.
        y: Axis::nice(lr_lo.min(0.0), lr_hi, PLOT_TICKS.div_ceil(2).max(MIN_TICKS)),
    };
    let mut out = header(title);
    loss.draw_frame(&mut out, "loss", "loss", None);
    lr.draw_frame(&mut out, "lr", "learning rate", Some("optimizer step"));
    loss.draw_line(&mut out, "train-loss", &s.train, TRAIN_COLOR, None);
    let mut legend = vec![("train", TRAIN_COLOR, None, false)];
    if !s.valid.is_empty() {
        loss.draw_line(
            &mut out,
            "valid-loss",
            &s.valid,
            VALID_COLOR,
            Some(VALID_DASH),
        );
        loss.draw_dots(&mut out, "valid-points", &s.valid, VALID_COLOR);
        legend.push(("validation", VALID_COLOR, Some(VALID_DASH), true));
    }
    loss.draw_legend(&mut out, &legend);
    lr.draw_line(&mut out, "learning-rate", &s.lr, LR_COLOR, None);
    out.push_str("</g>\n</svg>\n");
    out
}

/// The document's start: XML declaration, the `svg` element, a white
/// background, the title, and the group every drawing goes in (closed by
/// [`loss_svg`]).
fn header(title: &str) -> String {
    let mut out = String::new();
    out.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}">"#
    );
    let _ = writeln!(out, "<title>{}</title>", escape(title));
    let _ = writeln!(
        out,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let _ = writeln!(
        out,
        r#"<g font-family="{FONT_FAMILY}" font-size="{FONT_SIZE}" fill="black">"#
    );
    let _ = writeln!(
        out,
        r#"<text id="title" x="{:.1}" y="{:.1}" text-anchor="middle" font-size="{TITLE_FONT_SIZE}">{}</text>"#,
        WIDTH / 2.0,
        MARGIN_TOP / 2.0 + TITLE_FONT_SIZE * BASELINE_SHIFT,
        escape(title)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(step: u64, loss: f64, val_loss: Option<f64>, lr: f64) -> StepLog {
        StepLog {
            step,
            loss,
            lr,
            grad_norm: 1.0,
            tokens: 64,
            tokens_per_s: 100.0,
            peak_rss_mib: 50.0,
            peak_gpu_mib: None,
            allreduce_ms: 0.0,
            val_loss,
            time: None,
            elapsed_s: step as f64,
        }
    }

    fn texts<'a>(doc: &'a roxmltree::Document, id: &str) -> Vec<&'a str> {
        let g = doc
            .descendants()
            .find(|n| n.attribute("id") == Some(id))
            .unwrap_or_else(|| panic!("no element {id}"));
        g.descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text())
            .collect()
    }

    #[test]
    fn nice_axes_take_round_ticks_that_cover_the_data() {
        let a = Axis::nice(2.87, 5.71, 6);
        assert_eq!((a.lo, a.hi, a.step), (2.0, 6.0, 1.0));
        assert_eq!(a.ticks(), [2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(a.label(3.0), "3");
        let b = Axis::nice(2.87, 3.31, 6);
        let labels: Vec<String> = b.ticks().iter().map(|&v| b.label(v)).collect();
        assert_eq!(labels, ["2.8", "2.9", "3.0", "3.1", "3.2", "3.3", "3.4"]);
        let s = Axis::steps(1.0, 16.0, 6);
        assert_eq!((s.lo, s.hi, s.step), (0.0, 16.0, 5.0));
        assert_eq!(s.ticks(), [0.0, 5.0, 10.0, 15.0]);
        assert_eq!(s.label(15.0), "15");
        let one = Axis::steps(1.0, 1.0, 6);
        assert!(one.step >= 1.0 && one.lo <= 1.0 && one.hi > 1.0, "{one:?}");
        let lr = Axis::nice(0.0, 3e-3, 3);
        assert_eq!((lr.step, lr.exp), (2e-3, -3));
        assert_eq!(lr.label(2e-3), "2");
        assert_eq!(lr.unit_suffix(), " (x 1e-3)");
        assert_eq!(Axis::nice(f64::NAN, 1.0, 6).lo, 0.0);
    }

    #[test]
    fn the_plot_is_svg_with_titled_ticked_axes_grid_and_both_series() {
        let logs: Vec<StepLog> = (1..=40)
            .map(|s| {
                let val = (s % 10 == 0).then_some(4.0 - s as f64 / 40.0);
                row(
                    s,
                    5.0 - s as f64 / 20.0,
                    val,
                    1e-3 * s.min(10) as f64 / 10.0,
                )
            })
            .collect();
        let svg = loss_svg("run <a&b>", &logs);
        let doc = roxmltree::Document::parse(&svg).expect("well-formed XML");
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        assert_eq!(texts(&doc, "title"), ["run <a&b>"]);
        assert_eq!(texts(&doc, "loss-y-title"), ["loss"]);
        assert_eq!(texts(&doc, "lr-x-title"), ["optimizer step"]);
        assert_eq!(texts(&doc, "lr-y-title"), ["learning rate (x 1e-3)"]);
        for axis in ["loss-x-ticks", "loss-y-ticks", "lr-x-ticks", "lr-y-ticks"] {
            assert!(
                texts(&doc, axis).len() >= 3,
                "{axis}: {:?}",
                texts(&doc, axis)
            );
        }
        assert_eq!(texts(&doc, "lr-x-ticks"), ["0", "10", "20", "30", "40"]);
        let grid = doc
            .descendants()
            .find(|n| n.attribute("id") == Some("loss-grid"))
            .unwrap();
        assert!(grid.children().filter(|n| n.has_tag_name("line")).count() >= 6);
        assert!(svg.contains(r#"id="train-loss""#) && svg.contains(r#"id="valid-loss""#));
        assert_eq!(texts(&doc, "legend"), ["train", "validation"]);
        let dots = doc
            .descendants()
            .find(|n| n.attribute("id") == Some("valid-points"))
            .unwrap();
        assert_eq!(
            dots.children().filter(|n| n.has_tag_name("circle")).count(),
            4
        );
    }

    #[test]
    fn without_validation_no_validation_series_and_empty_runs_still_draw() {
        let svg = loss_svg(
            "t",
            &[row(1, 5.0, None, 1e-3), row(2, f64::NAN, None, 1e-3)],
        );
        roxmltree::Document::parse(&svg).unwrap();
        assert!(!svg.contains("valid-loss") && !svg.contains(">validation<"));
        let empty = loss_svg("t", &[]);
        let doc = roxmltree::Document::parse(&empty).unwrap();
        assert!(texts(&doc, "loss-y-ticks").len() >= 3);
        assert!(!empty.contains("NaN") && !empty.contains("inf"));
    }

    #[test]
    fn long_runs_are_thinned_to_the_most_points_keeping_the_last() {
        let pts: Vec<(f64, f64)> = (1..=1007).map(|s| (s as f64, 1.0)).collect();
        let kept = thin(pts.clone(), 100);
        assert!(kept.len() <= 101, "{}", kept.len());
        assert_eq!(
            (kept[0], kept.last().copied()),
            (pts[0], pts.last().copied())
        );
        assert_eq!(thin(pts[..50].to_vec(), 100).len(), 50);
        let n = PLOT_MAX_POINTS * 3 + 7;
        let logs: Vec<StepLog> = (1..=n).map(|s| row(s, 3.0, None, 1e-3)).collect();
        let svg = loss_svg("t", &logs);
        let doc = roxmltree::Document::parse(&svg).unwrap();
        let line = doc
            .descendants()
            .find(|n| n.attribute("id") == Some("train-loss"))
            .unwrap();
        let drawn = line.attribute("points").unwrap().split(' ').count();
        assert!(drawn <= PLOT_MAX_POINTS as usize + 1, "{drawn}");
    }
}
