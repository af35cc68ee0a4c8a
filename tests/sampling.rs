//! argmax and sample: the CPU against naive f64 references (argmax, the tokens top-k and
//! top-p keep, the distribution of the draws by a chi-squared test), and every other device
//! against the CPU id for id.

#[macro_use]
mod common;

use kiln::ops::{SamplingParams, argmax, sample};
use kiln::{DType, Device, DeviceKind, Error, Tensor};
use proptest::prelude::*;

/// Logits of an LM-like spread (N(0, 3²)) from a seed, as f32 values of `dtype`.
fn logits(rows: usize, vocab: usize, seed: u64, dtype: DType) -> Vec<f32> {
    Tensor::randn(&[rows, vocab], 0.0, 3.0, seed, dtype, &Device::Cpu).unwrap().to_vec_f32().unwrap()
}

/// lavapipe runs a workgroup per row slowly: the draw-counting tests take fewer rows there
/// (its ids equal the CPU's bit for bit, which `same_seed_same_ids_on_every_device` checks).
fn software(device: &Device) -> bool {
    device.info().is_ok_and(|i| i.kind == DeviceKind::SoftwareAdapter)
}

fn upload(values: &[f32], rows: usize, vocab: usize, dtype: DType, device: &Device) -> Tensor {
    Tensor::from_f32(values, &[rows, vocab], dtype, device).unwrap()
}

fn ids(t: Tensor) -> Vec<u32> {
    assert_eq!(t.dtype(), DType::U32);
    t.to_vec::<u32>().unwrap()
}

/// The first index of the largest value, NaN below everything, −0 equal to +0.
fn reference_argmax(row: &[f32]) -> usize {
    let mut best: Option<(usize, f64)> = None;
    for (i, &v) in row.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| (v as f64) > b) {
            best = Some((i, v as f64));
        }
    }
    best.map_or(0, |(i, _)| i)
}

/// What the f64 reference says of each token under top-k and top-p (Hugging Face's
/// warpers, ties at a threshold kept): kept for sure, removed for sure, or within `margin`
/// of the top-p boundary, where f32 and f64 may disagree. Also the renormalised
/// probabilities of the kept tokens (zero elsewhere).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Verdict {
    Kept,
    Removed,
    Boundary,
}

fn reference_filter(row: &[f32], p: &SamplingParams, margin: f64) -> (Vec<Verdict>, Vec<f64>) {
    let x: Vec<f64> = row.iter().map(|&v| v as f64 / p.temperature as f64).collect();
    let max = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|v| (v - max).exp()).collect();
    let mut sorted: Vec<f64> = row.iter().map(|&v| v as f64).collect();
    sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let kth = if p.top_k == 0 || p.top_k >= row.len() { f64::NEG_INFINITY } else { sorted[p.top_k - 1] };
    let in_k: Vec<bool> = row.iter().map(|&v| v as f64 >= kth).collect();
    let mass_k: f64 = (0..row.len()).filter(|&i| in_k[i]).map(|i| e[i]).sum();
    let verdicts: Vec<Verdict> = (0..row.len())
        .map(|i| {
            if !in_k[i] {
                return Verdict::Removed;
            }
            if p.top_p >= 1.0 {
                return Verdict::Kept;
            }
            let above: f64 = (0..row.len()).filter(|&j| in_k[j] && row[j] > row[i]).map(|j| e[j]).sum::<f64>() / mass_k;
            let top_p = p.top_p as f64;
            if above < top_p - margin {
                Verdict::Kept
            } else if above > top_p + margin {
                Verdict::Removed
            } else {
                Verdict::Boundary
            }
        })
        .collect();
    let kept_mass: f64 = (0..row.len()).filter(|&i| verdicts[i] == Verdict::Kept).map(|i| e[i]).sum();
    let probs = (0..row.len()).map(|i| if verdicts[i] == Verdict::Kept { e[i] / kept_mass } else { 0.0 }).collect();
    (verdicts, probs)
}

fn argmax_matches_reference(device: &Device) {
    let vocabs: Vec<usize> =
        if device.is_cpu() { vec![1, 2, 7, 257, 1000, 4099, 49152] } else { vec![1, 2, 7, 257, 1000, 4099] };
    proptest!(common::cases(16), |(rows in prop::sample::select(vec![1usize, 3, 17]),
                                   vocab in prop::sample::select(vocabs.clone()),
                                   dtype in prop::sample::select(DType::ALL.to_vec()),
                                   coarse in any::<bool>(), seed in any::<u64>())| {
        let mut x = logits(rows, vocab, seed, dtype);
        if coarse {
            // Few distinct values, so ties decide.
            x.iter_mut().for_each(|v| *v = v.round());
        }
        let got = ids(argmax(&upload(&x, rows, vocab, dtype, device)).unwrap());
        let want: Vec<u32> = x.chunks(vocab).map(|r| reference_argmax(r) as u32).collect();
        prop_assert_eq!(got, want, "{} [{}, {}] {}", device, rows, vocab, dtype);
    });
}

fn argmax_ranks_special_values(device: &Device) {
    let (inf, nan) = (f32::INFINITY, f32::NAN);
    let rows: [[f32; 4]; 7] = [
        [nan, 1.0, 3.0, nan],
        [nan, nan, nan, nan],
        [-inf, -inf, -inf, -inf],
        [-0.0, 0.0, -1.0, nan],
        [0.0, -0.0, -inf, -2.0],
        [1.0, inf, nan, inf],
        [-inf, nan, -inf, -6e4],
    ];
    let want = [2u32, 0, 0, 0, 0, 1, 3];
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    for dtype in DType::ALL {
        let t = upload(&flat, 7, 4, dtype, device);
        assert_eq!(ids(argmax(&t).unwrap()), want, "{device} {dtype}");
        let greedy = SamplingParams { temperature: 0.0, top_k: 3, top_p: 0.5, seed: 9 };
        assert_eq!(ids(sample(&t, &greedy, 4).unwrap()), want, "{device} {dtype}: temperature 0 is argmax");
    }
}

/// Sampling settings a generation loop uses.
fn settings() -> Vec<SamplingParams> {
    let p = |temperature, top_k, top_p, seed| SamplingParams { temperature, top_k, top_p, seed };
    vec![
        p(1.0, 0, 1.0, 1),
        p(0.7, 50, 1.0, 2),
        p(1.3, 0, 0.9, 3),
        p(0.8, 40, 0.95, 4),
        p(1.0, 1, 1.0, 5),
        p(2.0, 0, 0.05, 6),
        p(0.6, 5, 0.5, u64::MAX),
        p(100.0, 0, 0.999, 7),
    ]
}

/// The CPU and the device pick the same ids for the same seed, step and logits; on the CPU,
/// the draw is reproducible and moves with the step and the seed.
fn same_seed_same_ids_on_every_device(device: &Device) {
    let shapes: &[(usize, usize)] =
        if device.is_cpu() { &[(4, 49152), (64, 3001), (33, 1)] } else { &[(64, 3001), (97, 257), (33, 1)] };
    for &(rows, vocab) in shapes {
        for dtype in DType::ALL {
            let x = logits(rows, vocab, (rows * vocab) as u64, dtype);
            let on_cpu = upload(&x, rows, vocab, dtype, &Device::Cpu);
            let here = upload(&x, rows, vocab, dtype, device);
            for (n, params) in settings().iter().enumerate() {
                let step = 1000 + n as u64;
                let want = ids(sample(&on_cpu, params, step).unwrap());
                assert!(want.iter().all(|&i| (i as usize) < vocab), "cpu ids in range: {want:?}");
                let got = ids(sample(&here, params, step).unwrap());
                assert_eq!(got, want, "{device} [{rows}, {vocab}] {dtype} {params:?}");
                if device.is_cpu() && vocab > 1 && params.top_k != 1 {
                    let again = ids(sample(&on_cpu, params, step).unwrap());
                    assert_eq!(again, want, "the same call, the same ids");
                    let next = ids(sample(&on_cpu, params, step + 1).unwrap());
                    let other =
                        ids(sample(&on_cpu, &SamplingParams { seed: params.seed ^ 1, ..*params }, step).unwrap());
                    if params.top_p > 0.1 && vocab > 1000 {
                        assert_ne!(next, want, "another step, other draws");
                        assert_ne!(other, want, "another seed, other draws");
                    }
                }
            }
        }
    }
}

/// The Wilson–Hilferty approximation of the chi-squared quantile at 1 − 0.001.
fn chi2_critical(df: usize) -> f64 {
    let (k, z) = (df as f64, 3.09);
    k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
}

/// Pearson's statistic of `counts` against `probs` (bins with expectation under 5 merged)
/// and its degrees of freedom.
fn chi2(counts: &[usize], probs: &[f64]) -> (f64, usize) {
    let n: usize = counts.iter().sum();
    let (mut stat, mut bins) = (0.0, 0);
    let (mut pooled_o, mut pooled_e) = (0.0, 0.0);
    for (&o, &p) in counts.iter().zip(probs) {
        let e = p * n as f64;
        if e >= 5.0 {
            stat += (o as f64 - e).powi(2) / e;
            bins += 1;
        } else {
            pooled_o += o as f64;
            pooled_e += e;
        }
    }
    if pooled_e > 0.0 {
        stat += (pooled_o - pooled_e).powi(2) / pooled_e.max(1e-12);
        bins += 1;
    }
    (stat, bins - 1)
}

/// 10⁴ draws of one row (2 steps × 5000 rows, all of the same logits; 2 × 1000 on lavapipe)
/// against the f64 softmax, plain and under top-k and top-p renormalised; no draw outside
/// the kept set.
fn draws_follow_the_distribution(device: &Device) {
    let row: Vec<f32> = vec![2.0, 1.5, 1.2, 1.0, 0.5, 0.0, -0.3, -0.5, -1.0, -2.0, -4.0, -30.0];
    let vocab = row.len();
    let rows = if software(device) { 1000 } else { 5000 };
    let flat: Vec<f32> = row.iter().copied().cycle().take(rows * vocab).collect();
    let x = upload(&flat, rows, vocab, DType::F32, device);
    let p = |temperature, top_k, top_p| SamplingParams { temperature, top_k, top_p, seed: 0x5eed };
    for params in [p(1.0, 0, 1.0), p(0.8, 0, 1.0), p(1.5, 5, 1.0), p(1.0, 0, 0.7), p(1.2, 6, 0.8)] {
        let (verdicts, probs) = reference_filter(&row, &params, 1e-6);
        assert!(verdicts.iter().all(|v| *v != Verdict::Boundary), "the test's logits keep off the top-p boundary");
        let mut counts = vec![0usize; vocab];
        for step in [11, 12] {
            for id in ids(sample(&x, &params, step).unwrap()) {
                counts[id as usize] += 1;
            }
        }
        for (i, c) in counts.iter().enumerate() {
            assert!(verdicts[i] == Verdict::Kept || *c == 0, "{device} {params:?}: token {i} drawn {c} times");
        }
        let (stat, df) = chi2(&counts, &probs);
        assert!(
            stat <= chi2_critical(df),
            "{device} {params:?}: chi² {stat:.1} > {:.1} ({df} df), counts {counts:?}",
            chi2_critical(df)
        );
    }
}

/// Random rows and settings, 2000 draws each (500 on lavapipe): every draw is a token the f64 reference keeps (or one within
/// 10⁻⁵ of the top-p boundary), and every kept token expected 20 times or more is drawn.
fn draws_stay_in_the_kept_set(device: &Device) {
    let (cases, rows) = if software(device) { (4, 500) } else { (12, 2000) };
    proptest!(common::cases(cases), |(vocab in prop::sample::select(vec![7usize, 50, 301]),
                                   temperature in 0.3f32..2.0,
                                   top_k in prop::sample::select(vec![0usize, 1, 3, 20]),
                                   top_p in prop::sample::select(vec![1.0f32, 0.9, 0.5, 0.2]),
                                   seed in any::<u64>())| {
        let row = logits(1, vocab, seed, DType::F32);
        let flat: Vec<f32> = row.iter().copied().cycle().take(rows * vocab).collect();
        let params = SamplingParams { temperature, top_k, top_p, seed };
        let got = ids(sample(&upload(&flat, rows, vocab, DType::F32, device), &params, 3).unwrap());
        let (verdicts, probs) = reference_filter(&row, &params, 1e-5);
        let mut counts = vec![0usize; vocab];
        for &id in &got {
            prop_assert!(verdicts[id as usize] != Verdict::Removed, "{} {:?}: drew removed token {}", device, params, id);
            counts[id as usize] += 1;
        }
        for i in 0..vocab {
            if verdicts[i] == Verdict::Kept && probs[i] * rows as f64 >= 20.0 {
                prop_assert!(counts[i] > 0, "{} {:?}: kept token {} (p = {}) never drawn", device, params, i, probs[i]);
            }
        }
    });
}

/// A temperature near 0 gives the argmax wherever the top logit leads by 10⁻³.
fn low_temperature_is_argmax(device: &Device) {
    let (rows, vocab) = (40, 1000);
    for dtype in DType::ALL {
        let x = logits(rows, vocab, 77, dtype);
        let t = upload(&x, rows, vocab, dtype, device);
        let greedy = ids(argmax(&t).unwrap());
        for temperature in [0.0, 1e-7] {
            let params = SamplingParams { temperature, top_k: 0, top_p: 1.0, seed: 3 };
            let got = ids(sample(&t, &params, 0).unwrap());
            for (r, chunk) in x.chunks(vocab).enumerate() {
                let mut s: Vec<f32> = chunk.to_vec();
                s.sort_by(|a, b| b.partial_cmp(a).unwrap());
                if temperature == 0.0 || s[0] - s[1] >= 1e-3 {
                    assert_eq!(got[r], greedy[r], "{device} {dtype} T = {temperature} row {r}");
                }
            }
        }
    }
}

/// −∞ logits (masked tokens) are never drawn, +∞ ones share the draw, NaN is never drawn;
/// a row of −∞ is uniform and a row of NaN gives 0.
fn special_logits_are_drawn_as_documented(device: &Device) {
    let (inf, nan) = (f32::INFINITY, f32::NAN);
    let rows = 400;
    let patterns: [[f32; 5]; 4] = [
        [0.0, -inf, 1.0, nan, -inf],
        [inf, 5.0, inf, nan, 0.0],
        [-inf, -inf, -inf, -inf, -inf],
        [nan, nan, nan, nan, nan],
    ];
    let allowed: [&[u32]; 4] = [&[0, 2], &[0, 2], &[0, 1, 2, 3, 4], &[0]];
    for (pattern, allowed) in patterns.iter().zip(allowed) {
        let flat: Vec<f32> = pattern.iter().copied().cycle().take(rows * 5).collect();
        for dtype in DType::ALL {
            let x = upload(&flat, rows, 5, dtype, device);
            for params in [SamplingParams::default(), SamplingParams { top_k: 2, top_p: 0.9, ..Default::default() }] {
                let got = ids(sample(&x, &params, 1).unwrap());
                for a in allowed.iter() {
                    assert!(got.contains(a), "{device} {pattern:?} {params:?}: token {a} never drawn");
                }
                assert!(got.iter().all(|i| allowed.contains(i)), "{device} {pattern:?} {params:?}: drew {got:?}");
            }
        }
    }
}

/// Every row of a poisoned output is written, for row counts that fill no grid evenly.
fn every_row_is_written(device: &Device) {
    for (rows, vocab) in [(1, 1), (257, 3), (1031, 31)] {
        let x = upload(&logits(rows, vocab, 5, DType::BF16), rows, vocab, DType::BF16, device);
        for got in [ids(argmax(&x).unwrap()), ids(sample(&x, &SamplingParams::default(), 0).unwrap())] {
            assert_eq!(got.len(), rows);
            assert!(got.iter().all(|&i| (i as usize) < vocab), "{device} [{rows}, {vocab}]: an unwritten id");
        }
    }
}

fn bad_inputs_are_refused(device: &Device) {
    let x = Tensor::zeros(&[2, 5], DType::F32, device).unwrap();
    let with = |temperature, top_p| SamplingParams { temperature, top_p, ..Default::default() };
    for params in [with(-1.0, 1.0), with(f32::NAN, 1.0), with(f32::INFINITY, 1.0)] {
        assert!(matches!(sample(&x, &params, 0), Err(Error::InvalidArgument(_))), "{device} {params:?}");
    }
    for top_p in [0.0, -0.5, 1.5, f32::NAN] {
        assert!(matches!(sample(&x, &with(1.0, top_p), 0), Err(Error::InvalidArgument(_))), "{device} {top_p}");
    }
    let ok = SamplingParams::default();
    for shape in [&[5][..], &[1, 2, 5], &[]] {
        let t = Tensor::zeros(shape, DType::F32, device).unwrap();
        assert!(matches!(argmax(&t), Err(Error::Shape(_))), "{device} {shape:?}");
        assert!(matches!(sample(&t, &ok, 0), Err(Error::Shape(_))), "{device} {shape:?}");
    }
    let ints = Tensor::zeros(&[2, 5], DType::U32, device).unwrap();
    assert!(matches!(argmax(&ints), Err(Error::DType(_))));
    assert!(matches!(sample(&ints, &ok, 0), Err(Error::DType(_))));
    let no_vocab = Tensor::zeros(&[2, 0], DType::F32, device).unwrap();
    assert!(matches!(argmax(&no_vocab), Err(Error::InvalidArgument(_))));
    let no_rows = Tensor::zeros(&[0, 5], DType::F16, device).unwrap();
    assert_eq!(sample(&no_rows, &ok, 0).unwrap().shape(), &[0]);
    // A top_k past the vocabulary keeps every token.
    let x = upload(&logits(3, 5, 1, DType::F32), 3, 5, DType::F32, device);
    let all = SamplingParams { top_k: 1 << 40, ..Default::default() };
    assert_eq!(ids(sample(&x, &all, 2).unwrap()), ids(sample(&x, &ok, 2).unwrap()));
}

device_tests!(
    argmax_matches_reference,
    argmax_ranks_special_values,
    same_seed_same_ids_on_every_device,
    draws_follow_the_distribution,
    draws_stay_in_the_kept_set,
    low_temperature_is_argmax,
    special_logits_are_drawn_as_documented,
    every_row_is_written,
    bad_inputs_are_refused,
);
