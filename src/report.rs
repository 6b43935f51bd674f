//! `report.svg`: a picture of one run, drawn from its `metrics.jsonl` and `status.json` with
//! plotters' SVG backend: training loss (raw and smoothed), learning rate, gradient norm, step
//! time and peak memory against step; the primary metric per epoch against the baseline; the
//! promotion decision and the memory caps applied. The daemon draws it when a run ends;
//! `rerankd report RUN` (re)draws it.

use std::path::Path;

use anyhow::Context;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::store::Status;
use crate::store::atomic::write_atomic;
use crate::store::events::{Event, Logged, Split, Which};
use crate::store::metrics::read_events;
use crate::store::paths::RunFiles;

/// At most this many points per drawn series: a longer run is thinned evenly (the smoothed loss
/// is computed over every step first), so the file stays small whatever the run's length.
const MAX_POINTS: usize = 2000;
/// TensorBoard-style smoothing weight of the smoothed loss (debiased exponential average).
const SMOOTHING: f64 = 0.9;

const WIDTH: u32 = 1500;
const HEIGHT: u32 = 1000;
const HEADER: u32 = 150;
const FONT: &str = "sans-serif";

/// One optimizer step as its `step` event recorded it.
#[derive(Debug, Clone, Copy)]
struct Step {
    step: f64,
    loss: f64,
    lr: f64,
    grad_norm: f64,
    step_time_ms: f64,
    peak_mem_mb: f64,
}

/// Everything a report shows, read from a run's files.
#[derive(Debug, Default)]
pub struct RunData {
    pub run_id: String,
    pub corpus: String,
    pub state: String,
    /// Why the run ended as it did (status.json's reason or error), when it says.
    pub ended: Option<String>,
    pub primary: String,
    steps: Vec<Step>,
    baseline: Option<f64>,
    /// (epoch, primary metric) per evaluated epoch.
    epochs: Vec<(f64, f64)>,
    /// The epoch chosen as candidate, if any.
    candidate: Option<(f64, f64)>,
    /// The `promote` event: (promoted, reason).
    promotion: Option<(bool, String)>,
    /// The memory caps applied, in words.
    caps: Vec<String>,
}

impl RunData {
    pub fn load(files: &RunFiles) -> anyhow::Result<Self> {
        let st = Status::read(&files.status()).with_context(|| format!("reading {}", files.status().display()))?;
        let events = read_events(&files.metrics())?;
        let mut d = RunData {
            run_id: st.run_id.to_string(),
            corpus: st.corpus.to_string(),
            state: st.state.as_str().to_string(),
            ended: st.error.clone().or(st.reason.clone()),
            primary: "ndcg@10".into(),
            ..Self::default()
        };
        if let Ok(job) = crate::store::atomic::read_json::<crate::job::Job>(&files.job()) {
            d.primary = job.eval.primary_metric;
        }
        for e in &events {
            d.add(e);
        }
        Ok(d)
    }

    fn add(&mut self, e: &Logged) {
        let finite = |v: f64| Some(v).filter(|v| v.is_finite());
        match &e.event {
            Event::Step(s) => {
                if let Some(loss) = finite(f64::from(s.loss)) {
                    let step = s.step as f64 + 1.0;
                    // A run resumed from an earlier checkpoint redoes steps: the later attempt's
                    // record of a step replaces the earlier one.
                    self.steps.retain(|x| x.step < step);
                    self.steps.push(Step {
                        step,
                        loss,
                        lr: s.lr,
                        grad_norm: s.grad_norm,
                        step_time_ms: s.step_time_ms,
                        peak_mem_mb: s.peak_mem_mb.map_or(f64::NAN, |m| m as f64),
                    });
                }
            }
            Event::Eval(ev) => {
                // The baseline and candidate on dev (held-out evaluations are not drawn).
                let m = ev.metrics.get(&self.primary).copied().and_then(finite);
                let epoch = ev.epoch.unwrap_or(0) as f64 + 1.0;
                match (ev.split, ev.which, m) {
                    (Split::Heldout, ..) | (_, _, None) => {}
                    (Split::Dev, Which::Baseline, Some(m)) => self.baseline = Some(m),
                    (Split::Dev, Which::Epoch, Some(m)) => self.epochs.push((epoch, m)),
                    (Split::Dev, Which::Candidate, Some(m)) => self.candidate = Some((epoch, m)),
                }
            }
            Event::Promote(p) => self.promotion = Some((p.promoted, p.reason.clone())),
            Event::Cap(c) => self.caps.push(format!("{} {} -> {} ({})", c.field, c.from, c.to, c.why)),
            _ => {}
        }
    }

    /// The debiased exponential moving average of the loss, one value per step.
    fn smoothed_loss(&self) -> Vec<f64> {
        let mut avg = 0.0;
        let mut out = Vec::with_capacity(self.steps.len());
        for (i, s) in self.steps.iter().enumerate() {
            avg = SMOOTHING * avg + (1.0 - SMOOTHING) * s.loss;
            out.push(avg / (1.0 - SMOOTHING.powi(i as i32 + 1)));
        }
        out
    }
}

/// Draws `files`' run into `out` (atomically replaced), or into the run's own report.svg.
pub fn draw(files: &RunFiles, out: Option<&Path>) -> anyhow::Result<std::path::PathBuf> {
    let data = RunData::load(files)?;
    let svg = render(&data)?;
    let path = out.map(Path::to_path_buf).unwrap_or_else(|| files.report());
    write_atomic(&path, svg.as_bytes())?;
    Ok(path)
}

/// The report of `d` as an SVG document.
pub fn render(d: &RunData) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let (header, body) = root.split_vertically(HEADER);
        draw_header(&header, d)?;
        let panels = body.split_evenly((2, 3));
        let smoothed = d.smoothed_loss();
        let xs: Vec<f64> = d.steps.iter().map(|s| s.step).collect();
        let raw: Vec<f64> = d.steps.iter().map(|s| s.loss).collect();
        let col = |g: fn(&Step) -> f64| d.steps.iter().map(g).collect::<Vec<f64>>();
        line_panel(
            &panels[0],
            "Training loss",
            "loss (binary cross-entropy)",
            &[
                Series { name: "raw", xs: &xs, ys: &raw, color: BLUE.mix(0.35) },
                Series { name: "smoothed", xs: &xs, ys: &smoothed, color: BLUE.to_rgba() },
            ],
        )?;
        let lr = col(|s| s.lr);
        line_panel(
            &panels[1],
            "Learning rate",
            "learning rate",
            &[Series { name: "lr", xs: &xs, ys: &lr, color: RGBColor(0, 150, 60).to_rgba() }],
        )?;
        let grad = col(|s| s.grad_norm);
        line_panel(
            &panels[2],
            "Gradient norm (before clipping)",
            "L2 norm",
            &[Series { name: "grad norm", xs: &xs, ys: &grad, color: MAGENTA.to_rgba() }],
        )?;
        let ms = col(|s| s.step_time_ms);
        line_panel(
            &panels[3],
            "Step time",
            "milliseconds per step",
            &[Series { name: "step time", xs: &xs, ys: &ms, color: RGBColor(230, 120, 0).to_rgba() }],
        )?;
        let mem = col(|s| s.peak_mem_mb);
        line_panel(
            &panels[4],
            "Peak memory",
            "MB (peak resident)",
            &[Series { name: "peak memory", xs: &xs, ys: &mem, color: RED.to_rgba() }],
        )?;
        eval_panel(&panels[5], d)?;
        root.present()?;
    }
    Ok(svg)
}

fn draw_header(area: &DrawingArea<SVGBackend, Shift>, d: &RunData) -> anyhow::Result<()> {
    let title = format!("rerankd run {}  ·  corpus {}  ·  {}", d.run_id, d.corpus, d.state);
    area.draw(&Text::new(title, (20, 12), (FONT, 26).into_font().style(FontStyle::Bold)))?;
    let (decision, color) = match &d.promotion {
        // Reasons say "promoted: ..." / "not promoted: ..." themselves (older runs did not).
        Some((true, why)) if why.starts_with("promoted") => (why.clone(), RGBColor(0, 120, 0)),
        Some((false, why)) if why.starts_with("not promoted") => (why.clone(), RGBColor(170, 60, 0)),
        Some((true, why)) => (format!("promoted: {why}"), RGBColor(0, 120, 0)),
        Some((false, why)) => (format!("not promoted: {why}"), RGBColor(170, 60, 0)),
        None => ("no promotion decision (the run ended before one)".to_string(), RGBColor(90, 90, 90)),
    };
    // A long decision (held-out comparisons) takes two lines.
    let mut y = 52;
    for line in wrap(&decision, 150, 2) {
        area.draw(&Text::new(line, (20, y), (FONT, 18).into_font().color(&color)))?;
        y += 24;
    }
    let caps =
        if d.caps.is_empty() { "memory caps: none".to_string() } else { format!("memory caps: {}", d.caps.join("; ")) };
    area.draw(&Text::new(clip(&caps, 160), (20, y + 6), (FONT, 16).into_font()))?;
    let summary = match (&d.ended, d.steps.last()) {
        (Some(why), _) => format!("{} steps · ended: {why}", d.steps.len()),
        (None, Some(_)) => format!("{} steps", d.steps.len()),
        (None, None) => "no training steps recorded".to_string(),
    };
    let grey = RGBColor(70, 70, 70);
    area.draw(&Text::new(clip(&summary, 160), (20, y + 32), (FONT, 16).into_font().color(&grey)))?;
    Ok(())
}

/// `s` in at most `lines` lines of about `width` characters, broken at spaces; the last clipped.
fn wrap(s: &str, width: usize, lines: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut cur = String::new();
    for w in s.split(' ') {
        if !cur.is_empty() && cur.chars().count() + 1 + w.chars().count() > width && out.len() + 1 < lines {
            out.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(w);
    }
    out.push(clip(&cur, width + 10));
    out
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n { s.to_string() } else { format!("{}…", s.chars().take(n).collect::<String>()) }
}

struct Series<'a> {
    name: &'a str,
    xs: &'a [f64],
    ys: &'a [f64],
    color: RGBAColor,
}

impl Series<'_> {
    /// The finite points, thinned evenly to at most MAX_POINTS.
    fn points(&self) -> Vec<(f64, f64)> {
        let all: Vec<(f64, f64)> = self
            .xs
            .iter()
            .zip(self.ys)
            .map(|(&x, &y)| (x, y))
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        let stride = all.len().div_ceil(MAX_POINTS).max(1);
        let mut out: Vec<(f64, f64)> = all.iter().step_by(stride).copied().collect();
        if let Some(&last) = all.last()
            && out.last() != Some(&last)
        {
            out.push(last);
        }
        out
    }
}

/// A range that contains `vals`, with `below` and `above` of its span as room (for a legend),
/// never empty.
fn range(vals: impl Iterator<Item = f64>, below: f64, above: f64) -> (f64, f64) {
    let (lo, hi) = vals.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let span = if hi > lo { hi - lo } else { lo.abs().max(1e-3) * 0.5 };
    (lo - span * below, hi + span * above)
}

fn line_panel(
    area: &DrawingArea<SVGBackend, Shift>,
    title: &str,
    y_desc: &str,
    series: &[Series],
) -> anyhow::Result<()> {
    let pts: Vec<Vec<(f64, f64)>> = series.iter().map(Series::points).collect();
    let (x0, x1) = range(pts.iter().flatten().map(|p| p.0), 0.02, 0.02);
    // With a legend (upper right), room above the data for it.
    let above = if series.len() > 1 { 0.35 } else { 0.08 };
    let (y0, y1) = range(pts.iter().flatten().map(|p| p.1), 0.08, above);
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(75)
        .build_cartesian_2d(x0.max(0.0)..x1, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| short(*y))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    if pts.iter().all(Vec::is_empty) {
        chart.plotting_area().draw(&Text::new("no steps recorded", (x0.max(0.0), (y0 + y1) / 2.0), (FONT, 16)))?;
        return Ok(());
    }
    for (s, p) in series.iter().zip(&pts) {
        let color = s.color;
        chart
            .draw_series(LineSeries::new(p.iter().copied(), color.stroke_width(2)))?
            .label(s.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    if series.len() > 1 {
        chart.configure_series_labels().border_style(BLACK.mix(0.3)).background_style(WHITE.mix(0.85)).draw()?;
    }
    Ok(())
}

/// The primary metric per epoch, the baseline as a horizontal line, the candidate marked.
fn eval_panel(area: &DrawingArea<SVGBackend, Shift>, d: &RunData) -> anyhow::Result<()> {
    let title = format!("Dev {} per epoch", d.primary);
    let n = d.epochs.iter().map(|e| e.0).fold(1.0, f64::max);
    // Room below the data for the legend (lower right).
    let (y0, y1) = range(d.epochs.iter().map(|e| e.1).chain(d.baseline).chain(d.candidate.map(|c| c.1)), 0.6, 0.1);
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(75)
        .build_cartesian_2d(0.5..n + 0.5, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(d.primary.as_str())
        .x_labels((n as usize).clamp(1, 10))
        .x_label_formatter(&|x| if (x - x.round()).abs() < 1e-6 { format!("{x:.0}") } else { String::new() })
        .y_label_formatter(&|y| format!("{y:.3}"))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    let grey = RGBColor(90, 90, 90);
    if let Some(b) = d.baseline {
        chart
            .draw_series(LineSeries::new([(0.5, b), (n + 0.5, b)], grey.stroke_width(2)))?
            .label(format!("baseline {b:.4}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey.stroke_width(2)));
    }
    if !d.epochs.is_empty() {
        let blue = BLUE;
        chart
            .draw_series(LineSeries::new(d.epochs.iter().copied(), blue.stroke_width(2)))?
            .label("epoch")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], blue.stroke_width(2)));
        chart.draw_series(d.epochs.iter().map(|&p| Circle::new(p, 4, blue.filled())))?;
    }
    if let Some(c) = d.candidate {
        let green = RGBColor(0, 140, 0);
        chart
            .draw_series([Circle::new(c, 8, green.stroke_width(3))])?
            .label(format!("candidate (epoch {:.0}) {:.4}", c.0, c.1))
            .legend(move |(x, y)| Circle::new((x + 10, y), 5, green.stroke_width(2)));
    }
    if d.epochs.is_empty() && d.baseline.is_none() {
        chart.plotting_area().draw(&Text::new("no evaluation recorded", (0.6, (y0 + y1) / 2.0), (FONT, 16)))?;
    } else {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .border_style(BLACK.mix(0.3))
            .background_style(WHITE.mix(0.85))
            .draw()?;
    }
    Ok(())
}

/// An axis number in few characters: 2.0e-5, 0.043, 1.5, 1234.
fn short(v: f64) -> String {
    let a = v.abs();
    if a < 1e-12 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(i: u64, loss: f32) -> Logged {
        let s = crate::store::events::Step {
            step: i,
            epoch: 0,
            loss,
            lr: 1e-4,
            grad_norm: 1.0,
            step_time_ms: 1.0,
            pairs: 1,
            tokens: 1,
            peak_mem_mb: None,
        };
        Logged { ts: String::new(), seq: i, run_id: "r".into(), event: Event::Step(s) }
    }

    #[test]
    fn smoothed_loss_is_debiased_and_thinning_keeps_the_ends() {
        let mut d = RunData::default();
        for i in 0..5000 {
            d.add(&step(i, 1.0));
        }
        // A constant loss stays constant under debiased smoothing (no ramp up from zero).
        assert!(d.smoothed_loss().iter().all(|v| (v - 1.0).abs() < 1e-12));
        let xs: Vec<f64> = d.steps.iter().map(|s| s.step).collect();
        let ys: Vec<f64> = d.steps.iter().map(|s| s.loss).collect();
        let p = Series { name: "x", xs: &xs, ys: &ys, color: BLUE.to_rgba() }.points();
        assert!(p.len() <= MAX_POINTS + 1, "{}", p.len());
        assert_eq!(p.first().unwrap().0, 1.0);
        assert_eq!(p.last().unwrap().0, 5000.0);
    }

    #[test]
    fn steps_redone_after_a_resume_replace_the_earlier_ones() {
        let mut d = RunData::default();
        for i in 0..10 {
            d.add(&step(i, 1.0));
        }
        for i in 6..12 {
            d.add(&step(i, 2.0));
        }
        let xs: Vec<f64> = d.steps.iter().map(|s| s.step).collect();
        assert_eq!(xs, (1..=12).map(f64::from).collect::<Vec<_>>());
        assert_eq!(d.steps[5].loss, 1.0);
        assert_eq!(d.steps[6].loss, 2.0);
    }

    #[test]
    fn an_empty_run_still_renders() {
        let d = RunData { run_id: "r".into(), corpus: "c".into(), state: "failed".into(), ..RunData::default() };
        let svg = render(&d).unwrap();
        assert!(svg.contains("<svg") && svg.contains("no steps recorded") && svg.contains("no evaluation recorded"));
    }
}
