//! The loss plot of a run: train loss per step and eval loss at each evaluation, against
//! the step, drawn with plotters into a PNG.

use crate::{Error, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

/// Fonts tried, in order, for the plot's text; the first that parses is used.
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers a system font as plotters' "sans-serif" once; whether one was found.
fn font_available() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        FONT_PATHS.iter().any(|path| {
            let Ok(bytes) = std::fs::read(path) else { return false };
            // plotters keeps fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
        })
    })
}

/// Draws `train` (step, loss) and `eval` (step, loss) into the PNG `path` (written whole,
/// through a temporary file). Without a TrueType font on the system the plot has its lines
/// and grid but no text; the return value says whether text was drawn.
pub fn loss_plot(path: &Path, train: &[(u64, f64)], eval: &[(u64, f64)]) -> Result<bool> {
    let (width, height) = (900u32, 540u32);
    let mut pixels = vec![0u8; (width * height * 3) as usize];
    let text = font_available();
    draw(&mut pixels, (width, height), train, eval, text)
        .map_err(|e| Error::Io(format!("drawing the loss plot: {e}")))?;
    let mut png = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut png),
        &pixels,
        width,
        height,
        image::ColorType::Rgb8,
    )
    .map_err(|e| Error::Io(format!("encoding the loss plot: {e}")))?;
    crate::fs::write_file(path, &png).map_err(|e| Error::Io(format!("writing {}: {e}", path.display())))?;
    Ok(text)
}

fn draw(
    pixels: &mut [u8],
    size: (u32, u32),
    train: &[(u64, f64)],
    eval: &[(u64, f64)],
    text: bool,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::with_buffer(pixels, size).into_drawing_area();
    root.fill(&WHITE)?;
    let finite = |p: &&(u64, f64)| p.1.is_finite();
    let all: Vec<&(u64, f64)> = train.iter().chain(eval).filter(finite).collect();
    let last_step = all.iter().map(|p| p.0).max().unwrap_or(1).max(1);
    let top = all.iter().map(|p| p.1).fold(0f64, f64::max).max(1e-3) * 1.05;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if text {
        builder.caption("loss", ("sans-serif", 24)).x_label_area_size(40).y_label_area_size(55);
    }
    let mut chart = builder.build_cartesian_2d(0u64..last_step, 0f64..top)?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("step").y_desc("loss");
    } else {
        mesh.disable_x_axis().disable_y_axis();
    }
    mesh.draw()?;
    let train_series = chart.draw_series(LineSeries::new(train.iter().filter(finite).copied(), &BLUE))?;
    if text {
        train_series.label("train").legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
    }
    let eval_points: Vec<(u64, f64)> = eval.iter().filter(finite).copied().collect();
    let eval_series = chart.draw_series(LineSeries::new(eval_points.clone(), RED.stroke_width(2)))?;
    if text {
        eval_series.label("eval").legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
    }
    chart.draw_series(eval_points.iter().map(|&p| Circle::new(p, 4, RED.filled())))?;
    if text {
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    }
    root.present()?;
    Ok(())
}
