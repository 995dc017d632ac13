//! Benchmark results as pictures: each row's ratio to its baseline (a
//! driver against its raw SDK, the in-memory driver against a bare
//! channel) as a horizontal bar chart in SVG, which BENCHMARKS.md shows
//! beside its tables.
//!
//! ```
//! use pubsub_conformance::chart::RatioChart;
//!
//! let mut chart = RatioChart::new("Kafka: pubsub / raw rdkafka", "raw rdkafka");
//! chart.row("send, 1 sender", 0.98, 0.97);
//! chart.row("receive", 1.01, 0.99);
//! let svg = chart.svg().unwrap();
//! assert!(svg.contains("send, 1 sender"));
//! ```

use std::io;
use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

/// The target every driver is held to, drawn as a dashed line.
const TARGET: f64 = 0.9;
const WIDTH: u32 = 760;
const ROW_HEIGHT: u32 = 34;
const FRAME_HEIGHT: u32 = 110;

/// Rows of ratios (pubsub over a baseline), first row on top: a bar for the
/// median of the tries, a dot for the ratio of the bests, a line at parity
/// and, against a raw SDK, a dashed line at the 0.9 target (bars under it
/// red).
#[derive(Clone, Debug)]
pub struct RatioChart {
    title: String,
    baseline: String,
    target: Option<f64>,
    rows: Vec<(String, f64, f64)>,
}

impl RatioChart {
    /// An empty chart; `baseline` names what pubsub is divided by.
    pub fn new(title: impl Into<String>, baseline: impl Into<String>) -> Self {
        RatioChart {
            title: title.into(),
            baseline: baseline.into(),
            target: Some(TARGET),
            rows: Vec::new(),
        }
    }

    /// Draws no target line: for a baseline that is not a raw SDK doing the
    /// same work (the in-memory driver against a bare channel).
    pub fn without_target(mut self) -> Self {
        self.target = None;
        self
    }

    /// Adds a row: the ratio of the best rates and the median of the
    /// per-try ratios. A ratio that is not finite (a side that measured
    /// nothing) is drawn as zero.
    pub fn row(&mut self, label: impl Into<String>, best: f64, median: f64) {
        let finite = |v: f64| if v.is_finite() { v.max(0.0) } else { 0.0 };
        self.rows.push((label.into(), finite(best), finite(median)));
    }

    /// Whether no row has been added.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The chart as an SVG document.
    pub fn svg(&self) -> io::Result<String> {
        let mut out = String::new();
        let height = FRAME_HEIGHT + ROW_HEIGHT * self.rows.len().max(1) as u32;
        {
            let root = SVGBackend::with_string(&mut out, (WIDTH, height)).into_drawing_area();
            self.draw(&root)
                .map_err(|e| io::Error::other(e.to_string()))?;
            root.present()
                .map_err(|e| io::Error::other(e.to_string()))?;
        }
        Ok(out)
    }

    /// Writes the chart to `<dir>/<name>.svg`, where `dir` is
    /// [`charts_dir`], and returns the path.
    pub fn write(&self, name: &str) -> io::Result<PathBuf> {
        let dir = charts_dir();
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{name}.svg"));
        std::fs::write(&path, self.svg()?)?;
        Ok(path)
    }

    /// Writes the chart as [`RatioChart::write`] does and says where on
    /// standard error; a failure to write is reported, not fatal, since the
    /// figures were printed already.
    pub fn write_and_report(&self, name: &str) {
        match self.write(name) {
            Ok(path) => eprintln!("chart: {}", path.display()),
            Err(e) => eprintln!("chart {name}: not written: {e}"),
        }
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, plotters::coord::Shift>,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
        root.fill(&WHITE)?;
        let n = self.rows.len().max(1);
        let widest = self
            .rows
            .iter()
            .map(|(_, b, m)| b.max(*m))
            .fold(1.0f64, f64::max);
        let x_max = (widest * 1.15).max(1.2);
        let label_width = self
            .rows
            .iter()
            .map(|(l, _, _)| l.chars().count())
            .max()
            .unwrap_or(4) as u32
            * 7
            + 16;
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(label_width.min(WIDTH / 2))
            // Segments 0..=n-1, one a row.
            .build_cartesian_2d(0.0..x_max, (0..n - 1).into_segmented())?;
        let labels: Vec<String> = self.rows.iter().map(|(l, _, _)| l.clone()).collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n)
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => labels.get(n - 1 - *i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .x_max_light_lines(1)
            .x_desc(format!(
                "pubsub / {} (bar: median of tries; dot: ratio of bests)",
                self.baseline
            ))
            .x_label_formatter(&|x| format!("{x:.1}"))
            .draw()?;

        let bar = RGBColor(66, 133, 244);
        for (row, (_, best, median)) in self.rows.iter().enumerate() {
            // The first row on top.
            let i = n - 1 - row;
            let color = match self.target {
                Some(t) if *median < t => RGBColor(219, 68, 55),
                _ => bar,
            };
            let mut median_bar = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(i)),
                    (*median, SegmentValue::Exact(i + 1)),
                ],
                color.mix(0.75).filled(),
            );
            median_bar.set_margin(6, 6, 0, 0);
            chart.draw_series(std::iter::once(median_bar))?;
            chart.draw_series(std::iter::once(Circle::new(
                (*best, SegmentValue::CenterOf(i)),
                4,
                BLACK.filled(),
            )))?;
            chart.draw_series(std::iter::once(Text::new(
                format!("{median:.2}"),
                (*median + x_max * 0.01, SegmentValue::CenterOf(i)),
                ("sans-serif", 12),
            )))?;
        }
        let line = |x: f64, style: ShapeStyle| {
            PathElement::new(
                vec![(x, SegmentValue::Exact(0)), (x, SegmentValue::Exact(n))],
                style,
            )
        };
        chart.draw_series(std::iter::once(line(1.0, BLACK.stroke_width(1))))?;
        if let Some(t) = self.target {
            chart.draw_series(dashed(t, n, RGBColor(120, 120, 120).stroke_width(1)))?;
        }
        Ok(())
    }
}

/// A vertical dashed line at `x` across `n` rows: a dash a half row.
fn dashed(
    x: f64,
    n: usize,
    style: ShapeStyle,
) -> impl Iterator<Item = PathElement<(f64, SegmentValue<usize>)>> {
    (0..n).map(move |i| {
        PathElement::new(
            vec![(x, SegmentValue::Exact(i)), (x, SegmentValue::CenterOf(i))],
            style,
        )
    })
}

/// Where charts go: `$PUBSUB_BENCH_CHARTS`, else `target/bench-charts` of
/// the workspace (beside the build's other output).
pub fn charts_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PUBSUB_BENCH_CHARTS") {
        return PathBuf::from(dir);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join("bench-charts")
}

fn workspace_root() -> PathBuf {
    // This crate sits at <root>/crates/pubsub-conformance.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_bar_and_a_dot_a_row_with_its_label() {
        let mut c = RatioChart::new("Test: pubsub / raw", "raw");
        c.row("1 sender", 0.98, 0.95);
        c.row("100 senders", 0.61, 0.58);
        c.row("broken", f64::NAN, f64::INFINITY);
        let svg = c.svg().unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        for text in [
            "Test: pubsub / raw",
            "1 sender",
            "100 senders",
            "0.95",
            "0.58",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
        assert_eq!(svg.matches("<circle").count(), 3, "a dot a row");
        // A bar under the target is drawn in red, one over it in blue.
        assert!(svg.contains("#DB4437"), "the 0.58 bar is red");
        assert!(svg.contains("#4285F4"), "the 0.95 bar is blue");
        let plain = RatioChart::new("t", "mpsc").without_target();
        let mut plain = plain;
        plain.row("r", 0.2, 0.2);
        assert!(
            !plain.svg().unwrap().contains("#DB4437"),
            "no target, no red"
        );
    }

    #[test]
    fn writes_where_asked() {
        let dir = std::env::temp_dir().join(format!("charts-{}", std::process::id()));
        std::env::set_var("PUBSUB_BENCH_CHARTS", &dir);
        let mut c = RatioChart::new("t", "raw");
        c.row("r", 1.0, 1.0);
        let path = c.write("one").unwrap();
        assert_eq!(path, dir.join("one.svg"));
        assert!(std::fs::read_to_string(&path).unwrap().contains("<svg"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
