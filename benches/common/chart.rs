//! Every bench's results as files: its rows as JSON, and an SVG chart of them (a bar per
//! contender with its run range and its ratio to the in-run reference it is read against, or a
//! line per series for a scaling run). Written under `BENCH_RESULTS_DIR`, else
//! `target/bench-results/`, as `NAME.json` and `NAME.svg`; the path is printed.

use std::fs;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::Serialize;

/// Where results go: `BENCH_RESULTS_DIR`, else `target/bench-results` of the checkout that
/// built the bench (an executable carried to another machine should be given the variable).
pub fn results_dir() -> PathBuf {
    std::env::var_os("BENCH_RESULTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                .parent()
                .expect("CARGO_TARGET_TMPDIR is target/tmp")
                .join("bench-results")
        })
}

/// Writes `value` as `NAME.json` and has `draw` make `NAME.svg`, in [`results_dir`]; says where.
fn write_files(
    name: &str,
    value: &impl Serialize,
    draw: impl FnOnce(&Path) -> Result<(), Box<dyn std::error::Error>>,
) {
    let dir = results_dir();
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let json = dir.join(format!("{name}.json"));
    fs::write(&json, serde_json::to_string_pretty(value).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", json.display()));
    let svg = dir.join(format!("{name}.svg"));
    draw(&svg).unwrap_or_else(|e| panic!("{}: {e}", svg.display()));
    println!("# results: {} and {}", json.display(), svg.display());
}

/// One contender's measurement: the median of its runs, their range, and its ratio to the
/// reference bar it is read against (`vs`), all from the same invocation.
#[derive(Serialize, Clone, Debug)]
pub struct Bar {
    pub label: String,
    pub median: f64,
    pub low: f64,
    pub high: f64,
    pub runs: usize,
    /// The reference's label and this median over the reference's median.
    pub vs: Option<(String, f64)>,
}

/// A bar chart: one bar per contender, in the order added.
#[derive(Serialize)]
pub struct BarChart {
    pub name: String,
    pub title: String,
    /// What the values are: "GB/s", "s", "MB/s", ...
    pub unit: String,
    /// True for times (shorter is better): only changes the axis caption.
    pub lower_is_better: bool,
    pub machine: String,
    pub bars: Vec<Bar>,
}

impl BarChart {
    pub fn new(name: &str, title: &str, unit: &str) -> BarChart {
        BarChart {
            name: name.into(),
            title: title.into(),
            unit: unit.into(),
            lower_is_better: false,
            machine: super::machine(),
            bars: Vec::new(),
        }
    }

    /// A bar of `samples` (one per run; nothing is added without any), not compared.
    pub fn bar(&mut self, label: &str, samples: &[f64]) {
        self.push(label, samples, None);
    }

    /// A bar of `samples`, with its median over the median of the bar labelled `reference`
    /// (added before it).
    pub fn bar_vs(&mut self, label: &str, samples: &[f64], reference: &str) {
        self.push(label, samples, Some(reference));
    }

    fn push(&mut self, label: &str, samples: &[f64], reference: Option<&str>) {
        if samples.is_empty() {
            return;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        let vs = reference.map(|r| {
            let of = self
                .bars
                .iter()
                .find(|b| b.label == r)
                .unwrap_or_else(|| panic!("chart {}: no reference bar {r:?}", self.name));
            (r.to_string(), median / of.median)
        });
        self.bars.push(Bar {
            label: label.into(),
            median,
            low: sorted[0],
            high: sorted[sorted.len() - 1],
            runs: sorted.len(),
            vs,
        });
    }

    /// Writes `NAME.json` and `NAME.svg` and says where.
    pub fn write(&self) {
        write_files(&self.name, self, |svg| self.draw(svg));
    }

    /// Horizontal bars (labels are long), the run range as a whisker, and the value and ratio
    /// written at the end of each bar.
    fn draw(&self, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
        let rows = self.bars.len().max(1);
        let height = 90 + 34 * rows as u32;
        let root = SVGBackend::new(path, (1000, height)).into_drawing_area();
        let body = draw_header(&root, &self.title, &self.machine)?;
        let max = self
            .bars
            .iter()
            .map(|b| b.high.max(b.median))
            .fold(0.0f64, f64::max)
            .max(f64::MIN_POSITIVE);
        // Segment 0 is at the bottom: the first bar goes on top.
        let at = |i: usize| rows - 1 - i;
        let labels: Vec<String> = self.bars.iter().rev().map(|b| b.label.clone()).collect();
        let mut chart = ChartBuilder::on(&body)
            .margin_right(20)
            .x_label_area_size(36)
            .y_label_area_size(330)
            .build_cartesian_2d(0.0..max * 1.7, (0..rows).into_segmented())?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .light_line_style(WHITE)
            .x_desc(if self.lower_is_better {
                format!("{} (shorter is better)", self.unit)
            } else {
                self.unit.clone()
            })
            .y_labels(rows)
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .label_style(("sans-serif", 12))
            .draw()?;
        let colour = |bar: &Bar| match bar.vs {
            None => RGBColor(150, 150, 150),
            Some(_) => RGBColor(52, 101, 164),
        };
        chart.draw_series(self.bars.iter().enumerate().map(|(i, bar)| {
            let mut rectangle = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(at(i))),
                    (bar.median, SegmentValue::Exact(at(i) + 1)),
                ],
                colour(bar).filled(),
            );
            rectangle.set_margin(4, 4, 0, 0);
            rectangle
        }))?;
        chart.draw_series(
            self.bars
                .iter()
                .enumerate()
                .filter(|(_, b)| b.runs > 1)
                .map(|(i, bar)| {
                    PathElement::new(
                        vec![
                            (bar.low, SegmentValue::CenterOf(at(i))),
                            (bar.high, SegmentValue::CenterOf(at(i))),
                        ],
                        BLACK.stroke_width(2),
                    )
                }),
        )?;
        chart.draw_series(self.bars.iter().enumerate().map(|(i, bar)| {
            let ratio = bar
                .vs
                .as_ref()
                .map_or(String::new(), |(r, x)| format!("  = {x:.2}x {r}"));
            Text::new(
                format!("{}{ratio}", value(bar.median, &self.unit)),
                (
                    bar.high.max(bar.median) + max * 0.01,
                    SegmentValue::CenterOf(at(i)),
                ),
                ("sans-serif", 12).into_font(),
            )
        }))?;
        root.present()?;
        Ok(())
    }
}

/// Distinct on white and in grey print.
const LINE_COLOURS: [RGBColor; 6] = [
    RGBColor(120, 120, 120),
    RGBColor(230, 97, 1),
    RGBColor(253, 184, 99),
    RGBColor(33, 102, 172),
    RGBColor(146, 197, 222),
    RGBColor(0, 0, 0),
];

/// Clears the canvas, writes the chart's title and the machine it ran on at the top, and
/// returns the area below for the chart itself.
fn draw_header<'a>(
    root: &DrawingArea<SVGBackend<'a>, plotters::coord::Shift>,
    title: &str,
    machine: &str,
) -> Result<DrawingArea<SVGBackend<'a>, plotters::coord::Shift>, Box<dyn std::error::Error>> {
    root.fill(&WHITE)?;
    let (header, body) = root.split_vertically(44);
    header.draw(&Text::new(title, (10, 8), ("sans-serif", 18).into_font()))?;
    header.draw(&Text::new(
        machine,
        (10, 28),
        ("sans-serif", 11).into_font().color(&RGBColor(90, 90, 90)),
    ))?;
    Ok(body)
}

fn value(v: f64, unit: &str) -> String {
    if v >= 100.0 {
        format!("{v:.0} {unit}")
    } else {
        format!("{v:.2} {unit}")
    }
}

/// One line of a [`LineChart`]: `(x, y)` points.
#[derive(Serialize)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// Lines over a shared x axis (a scaling run: throughput over shards).
#[derive(Serialize)]
pub struct LineChart {
    pub name: String,
    pub title: String,
    pub x_unit: String,
    pub y_unit: String,
    pub machine: String,
    pub series: Vec<Series>,
}

impl LineChart {
    pub fn new(name: &str, title: &str, x_unit: &str, y_unit: &str) -> LineChart {
        LineChart {
            name: name.into(),
            title: title.into(),
            x_unit: x_unit.into(),
            y_unit: y_unit.into(),
            machine: super::machine(),
            series: Vec::new(),
        }
    }

    /// Adds `(x, y)` to the series `label` (created on first use).
    pub fn point(&mut self, label: &str, x: f64, y: f64) {
        match self.series.iter_mut().find(|s| s.label == label) {
            Some(s) => s.points.push((x, y)),
            None => self.series.push(Series {
                label: label.into(),
                points: vec![(x, y)],
            }),
        }
    }

    /// Writes `NAME.json` and `NAME.svg` and says where.
    pub fn write(&self) {
        write_files(&self.name, self, |svg| self.draw(svg));
    }

    fn draw(&self, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
        let body = draw_header(&root, &self.title, &self.machine)?;
        // The x values (shard counts) as evenly spaced categories: 1, 2, 4, 8, 16 read better
        // than on a linear axis.
        let mut xs: Vec<f64> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        let slot = |x: f64| SegmentValue::CenterOf(xs.iter().position(|&v| v == x).unwrap_or(0));
        let y_max = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .fold(0.0f64, f64::max);
        let mut chart = ChartBuilder::on(&body)
            .margin(20)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(
                (0..xs.len().max(1)).into_segmented(),
                0.0..(y_max * 1.15).max(f64::MIN_POSITIVE),
            )?;
        chart
            .configure_mesh()
            .light_line_style(WHITE)
            .x_desc(self.x_unit.clone())
            .y_desc(self.y_unit.clone())
            .x_labels(xs.len().max(1))
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => xs.get(*i).map_or(String::new(), |x| format!("{x}")),
                _ => String::new(),
            })
            .label_style(("sans-serif", 12))
            .draw()?;
        for (i, series) in self.series.iter().enumerate() {
            let colour = LINE_COLOURS[i % LINE_COLOURS.len()];
            let points: Vec<_> = series.points.iter().map(|&(x, y)| (slot(x), y)).collect();
            chart
                .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))?
                .label(series.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                });
            chart.draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 3, colour.filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .draw()?;
        root.present()?;
        Ok(())
    }
}
