//! PNG bar charts: one panel per scenario, one bar per server.
//!
//! Text is drawn with a TrueType font found on the machine (DejaVu or Liberation
//! from Debian's font packages), so plotters needs no system font libraries.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context as _, anyhow};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Fonts tried in order.
const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// One bar.
#[derive(Debug, Clone)]
pub struct Bar {
    /// Under the bar (a server).
    pub label: String,
    /// Its height.
    pub value: f64,
}

/// One panel (a scenario).
#[derive(Debug, Clone)]
pub struct Panel {
    /// Above the panel.
    pub title: String,
    /// The y axis's unit.
    pub unit: String,
    /// The bars, left to right.
    pub bars: Vec<Bar>,
}

/// Registers the first font found, once per process.
fn ensure_font() -> anyhow::Result<()> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let (path, data) = FONT_PATHS
            .iter()
            .find_map(|path| std::fs::read(path).ok().map(|data| (path, data)))
            .ok_or_else(|| format!("no font found (tried {})", FONT_PATHS.join(", ")))?;
        // plotters keeps registered fonts for the whole process.
        let data: &'static [u8] = Box::leak(data.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, data)
            .map_err(|_| format!("{path} is not a usable font"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// Draws `panels` in a grid of up to three columns under `title` into a PNG.
pub fn draw(path: &Path, title: &str, panels: &[Panel]) -> anyhow::Result<()> {
    ensure_font()?;
    let cols = panels.len().clamp(1, 3);
    let rows = panels.len().div_ceil(cols).max(1);
    let size = (420 * cols as u32, 320 * rows as u32 + 50);
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 26))?;
    for (area, panel) in root.split_evenly((rows, cols)).iter().zip(panels) {
        draw_panel(area, panel)?;
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn draw_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    panel: &Panel,
) -> anyhow::Result<()> {
    let top = panel.bars.iter().map(|b| b.value).fold(0.0, f64::max);
    let top = if top > 0.0 { top * 1.2 } else { 1.0 };
    let count = panel.bars.len();
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(28)
        .y_label_area_size(64)
        .build_cartesian_2d((0..count).into_segmented(), 0.0..top)?;
    let label = |x: &SegmentValue<usize>| match x {
        SegmentValue::CenterOf(i) => panel
            .bars
            .get(*i)
            .map_or(String::new(), |b| b.label.clone()),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(panel.unit.as_str())
        .x_label_formatter(&label)
        .y_label_formatter(&|v| short(*v))
        .label_style(("sans-serif", 13))
        .draw()?;
    chart.draw_series(panel.bars.iter().enumerate().map(|(i, bar)| {
        let mut rect = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), bar.value),
            ],
            Palette99::pick(i).filled(),
        );
        rect.set_margin(0, 0, 10, 10);
        rect
    }))?;
    let value_style =
        TextStyle::from(("sans-serif", 14).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    chart.draw_series(panel.bars.iter().enumerate().map(|(i, bar)| {
        Text::new(
            short(bar.value),
            (SegmentValue::CenterOf(i), bar.value),
            value_style.clone(),
        )
    }))?;
    Ok(())
}

/// A number in few characters: 1.23, 45.6, 789, 12.3k, 4.56M.
fn short(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 1e6 {
        format!("{:.2}M", value / 1e6)
    } else if magnitude >= 1e4 {
        format!("{:.1}k", value / 1e3)
    } else if magnitude >= 100.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_numbers() {
        assert_eq!(short(1.234), "1.23");
        assert_eq!(short(45.67), "45.7");
        assert_eq!(short(789.4), "789");
        assert_eq!(short(12_345.0), "12.3k");
        assert_eq!(short(4_560_000.0), "4.56M");
    }
}
