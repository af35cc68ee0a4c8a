//! Shared by the benches: how long each measurement runs.

use criterion::BenchmarkGroup;
use criterion::measurement::WallTime;
use std::time::Duration;

/// 10 samples after a warm-up, measured over `seconds`; with `KILN_BENCH_QUICK` set (the GPU
/// check sets it) a fifth of the warm-up and a third of the measurement.
pub fn configure(group: &mut BenchmarkGroup<'_, WallTime>, seconds: u64) {
    let quick = std::env::var("KILN_BENCH_QUICK").is_ok();
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(if quick { 200 } else { 1000 }))
        .measurement_time(Duration::from_secs(if quick { seconds.div_ceil(3) } else { seconds }));
}
