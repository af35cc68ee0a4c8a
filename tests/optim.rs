//! The fused optimizer step: every device against torch.optim.AdamW's own trajectories
//! (tests/fixtures/make_adamw.py), the CPU against PyTorch's AdamW worked by hand, every
//! device against the CPU over 100 steps, clipping, skipping, the EWC term against finite
//! differences, Fisher accumulation, and bad input.

#[macro_use]
mod common;

use kiln::ops::optim::{AdamWHyper, ParamSlot, Penalty, StepReport, adamw_step, fisher_accumulate};
use kiln::{DType, Device, Error, Tensor};

/// A parameter's optimizer state on one device.
struct State {
    master: Tensor,
    m: Tensor,
    v: Tensor,
    working: Option<Tensor>,
    anchor: Option<Tensor>,
    fisher: Option<Tensor>,
}

impl State {
    fn new(shape: &[usize], seed: u64, working: Option<DType>, ewc: bool, device: &Device) -> State {
        let master = Tensor::randn(shape, 0.0, 1.0, seed, DType::F32, device).unwrap();
        State {
            working: working.map(|d| master.to_dtype(d).unwrap()),
            m: Tensor::zeros(shape, DType::F32, device).unwrap(),
            v: Tensor::zeros(shape, DType::F32, device).unwrap(),
            anchor: ewc.then(|| Tensor::randn(shape, 0.0, 1.0, seed + 1, DType::F32, device).unwrap()),
            fisher: ewc.then(|| Tensor::rand(shape, 0.0, 2.0, seed + 2, DType::F32, device).unwrap()),
            master,
        }
    }
}

fn step(states: &mut [State], grads: &[Tensor], h: &AdamWHyper, t: u64) -> kiln::Result<StepReport> {
    let mut slots: Vec<ParamSlot<'_>> = states
        .iter_mut()
        .zip(grads)
        .map(|(s, g)| ParamSlot {
            master: &mut s.master,
            m: &mut s.m,
            v: &mut s.v,
            grad: g,
            working: s.working.as_mut(),
            anchor: s.anchor.as_ref(),
            fisher: s.fisher.as_ref(),
        })
        .collect();
    adamw_step(&mut slots, h, t)
}

fn scalar_state(theta: f32) -> State {
    let t = |v: f32| Tensor::from_slice(&[v], &[1], &Device::Cpu).unwrap();
    State { master: t(theta), m: t(0.0), v: t(0.0), working: None, anchor: None, fisher: None }
}

#[test]
fn cpu_step_follows_pytorch_adamw_worked_by_hand() {
    // θ0 = 1, lr 0.1, betas (0.9, 0.999), eps 1e-8, weight decay 0.01; grads 0.5 then −0.25.
    // Step 1: m = 0.05, v = 0.00025; m̂ = 0.5, √v̂ = 0.5, so θ1 = 1·(1 − 0.001) − 0.1·0.5/(0.5 + 1e-8) = 0.899.
    // Step 2: m = 0.05 + 0.1·(−0.25 − 0.05) = 0.02, v = 0.999·0.00025 + 0.001·0.0625 = 0.00031225;
    //   m̂ = 0.02 / 0.19 = 0.1052632, √v̂ = √(0.00031225 / 0.001999) = 0.3952246,
    //   θ2 = 0.899·0.999 − 0.1·0.1052632 / (0.3952246 + 1e-8) = 0.898101 − 0.0266336 = 0.8714674.
    let h = AdamWHyper { lr: 0.1, weight_decay: 0.01, ..AdamWHyper::default() };
    let mut s = [scalar_state(1.0)];
    let grad = |g: f32| Tensor::from_slice(&[g], &[1], &Device::Cpu).unwrap();
    step(&mut s, &[grad(0.5)], &h, 1).unwrap();
    let read = |t: &Tensor| t.to_vec::<f32>().unwrap()[0];
    assert!((read(&s[0].master) - 0.899).abs() < 1e-6, "θ1 = {}", read(&s[0].master));
    // In f32, 1 − 0.999 is 0.00099998713: values agree to its relative error.
    let close = |x: f32, want: f64| ((x as f64) - want).abs() <= 2e-5 * want.abs();
    assert!(close(read(&s[0].m), 0.05) && close(read(&s[0].v), 0.00025), "m1 {}, v1 {}", read(&s[0].m), read(&s[0].v));
    step(&mut s, &[grad(-0.25)], &h, 2).unwrap();
    assert!(close(read(&s[0].m), 0.02), "m2 = {}", read(&s[0].m));
    assert!(close(read(&s[0].v), 0.00031225), "v2 = {}", read(&s[0].v));
    assert!((read(&s[0].master) - 0.8714674).abs() < 2e-6, "θ2 = {}", read(&s[0].master));
}

/// One case of the torch fixture: hyperparameters and rows of 48 values per step.
struct TorchCase {
    name: String,
    hyper: AdamWHyper,
    first_step: u64,
    steps: usize,
    p0: Vec<f32>,
    m0: Vec<f32>,
    v0: Vec<f32>,
    grads: Vec<f32>,
    param: Vec<f32>,
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
}

fn torch_cases() -> Vec<TorchCase> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/adamw_torch.safetensors");
    let file = kiln::io::SafetensorsFile::open(path).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&file.metadata().unwrap()["cases"]).unwrap();
    let read =
        |name: &str, part: &str| file.tensor(&format!("{name}.{part}"), &Device::Cpu).unwrap().to_vec::<f32>().unwrap();
    let mut cases = Vec::new();
    for (name, c) in meta.as_object().unwrap() {
        let f = |k: &str| c[k].as_f64().unwrap();
        let hyper = AdamWHyper {
            lr: f("lr"),
            beta1: c["betas"][0].as_f64().unwrap(),
            beta2: c["betas"][1].as_f64().unwrap(),
            eps: f("eps"),
            weight_decay: f("weight_decay"),
            ..AdamWHyper::default()
        };
        let p0 = read(name, "p0");
        let n = p0.len();
        let late = name.starts_with("late_");
        cases.push(TorchCase {
            name: name.clone(),
            hyper,
            first_step: c["first_step"].as_u64().unwrap_or(1),
            steps: c["steps"].as_u64().unwrap() as usize,
            m0: if late { read(name, "m0") } else { vec![0.0; n] },
            v0: if late { read(name, "v0") } else { vec![0.0; n] },
            grads: read(name, "grads"),
            param: read(name, "param"),
            exp_avg: read(name, "exp_avg"),
            exp_avg_sq: read(name, "exp_avg_sq"),
            p0,
        });
    }
    cases
}

/// The f32 constants of step `t` as torch computes them (f64, rounded once), as f64.
struct Constants {
    w1: f64,
    beta2: f64,
    w2: f64,
    decay: f64,
    step_size: f64,
    bc2_sqrt: f64,
    eps: f64,
}

impl Constants {
    fn new(h: &AdamWHyper, t: u64) -> Constants {
        let r = |x: f64| x as f32 as f64;
        Constants {
            w1: r(1.0 - h.beta1),
            beta2: r(h.beta2),
            w2: r(1.0 - h.beta2),
            decay: r(1.0 - h.lr * h.weight_decay),
            step_size: r(h.lr / (1.0 - h.beta1.powf(t as f64))),
            bc2_sqrt: r((1.0 - h.beta2.powf(t as f64)).sqrt()),
            eps: r(h.eps),
        }
    }
}

/// Unit roundoff of f32, and half its smallest subnormal.
const U: f64 = f32::EPSILON as f64 / 2.0;
const TINY: f64 = 1e-45;

/// How far two implementations that each round every operation of one element's step may
/// be apart, given how far apart their inputs are (`dm`, `dv`, `dtheta`: 0 when both start
/// from the same state). Each side rounds m' = m + w1·(g − m) (or β1·m + w1·g) at most 3
/// times, with every intermediate within |m| + |g|; v' = β2·v + w2·g·g 4 times within
/// β2·v + w2·g²; θ' = θ·decay − s·m'/(√v'/b + ε) 7 times (5 on the update's path). The
/// input differences pass through m' (factor 1 − w1), v' (β2), the update's partial
/// derivatives in m' and v', and θ·decay.
fn step_bounds(
    c: &Constants,
    theta: f64,
    m: f64,
    v: f64,
    g: f64,
    (dm, dv, dtheta): (f64, f64, f64),
) -> (f64, f64, f64) {
    let m1 = m + c.w1 * (g - m);
    let v1 = c.beta2 * v + c.w2 * g * g;
    let tol_m = 2.0 * 3.0 * U * (m.abs() + g.abs()) + (1.0 - c.w1) * dm + TINY;
    let tol_v = 2.0 * 4.0 * U * (c.beta2 * v + c.w2 * g * g) + c.beta2 * dv + TINY;
    let denom = v1.sqrt() / c.bc2_sqrt + c.eps;
    let update = c.step_size * m1 / denom;
    let theta1 = theta * c.decay - update;
    // ∂update/∂m' = s / denom; ∂update/∂v' = −s·m'/denom² · 1/(2·√v'·b).
    let via_v =
        if v1 > 0.0 { c.step_size * m1.abs() / (denom * denom) * tol_v / (2.0 * v1.sqrt() * c.bc2_sqrt) } else { 0.0 };
    let tol_theta = 2.0 * U * ((theta * c.decay).abs() + theta1.abs() + 5.0 * update.abs())
        + c.step_size * tol_m / denom
        + via_v
        + c.decay * dtheta
        + TINY;
    (tol_m, tol_v, tol_theta)
}

/// kiln's step against torch.optim.AdamW on torch's own inputs: from torch's state before
/// each step, kiln's θ, m and v after it are within the roundings both make; over the whole
/// run of 20 steps from the same start, within those roundings carried forward. Both of
/// torch's paths (foreach=False and the fused CPU kernel), β2 = 0.999 and 0.95, weight
/// decay, and one step at t = 10⁴.
fn follows_torch_adamw(device: &Device) {
    for case in torch_cases() {
        let n = case.p0.len();
        let row = |v: &[f32], t: usize| v[t * n..(t + 1) * n].to_vec();
        let run = |theta: &[f32], m: &[f32], v: &[f32], t: usize| -> [Vec<f32>; 3] {
            let t_ = |x: &[f32]| Tensor::from_slice(x, &[n], device).unwrap();
            let mut s = [State { master: t_(theta), m: t_(m), v: t_(v), working: None, anchor: None, fisher: None }];
            let report = step(&mut s, &[t_(&row(&case.grads, t))], &case.hyper, case.first_step + t as u64).unwrap();
            assert!(!report.skipped);
            [&s[0].master, &s[0].m, &s[0].v].map(|x| x.to_vec::<f32>().unwrap())
        };
        // The largest distance from torch seen, as a fraction of its bound.
        let worst = std::cell::Cell::new(0f64);
        let (same, compared) = (std::cell::Cell::new(0usize), std::cell::Cell::new(0usize));
        let check = |what: &str, got: &[f32], want: &[f32], tol: &[f64]| {
            for i in 0..n {
                let err = (got[i] as f64 - want[i] as f64).abs();
                worst.set(worst.get().max(err / tol[i]));
                same.set(same.get() + (got[i].to_bits() == want[i].to_bits()) as usize);
                compared.set(compared.get() + 1);
                assert!(
                    err <= tol[i],
                    "{device} {} {what}[{i}]: kiln {} torch {} (|Δ| {err:e} > {:e})",
                    case.name,
                    got[i],
                    want[i],
                    tol[i]
                );
            }
        };
        // From torch's state before each step.
        let (mut theta, mut m, mut v) = (case.p0.clone(), case.m0.clone(), case.v0.clone());
        for t in 0..case.steps {
            let c = Constants::new(&case.hyper, case.first_step + t as u64);
            let [kt, km, kv] = run(&theta, &m, &v, t);
            let g = row(&case.grads, t);
            let bounds: Vec<(f64, f64, f64)> = (0..n)
                .map(|i| step_bounds(&c, theta[i] as f64, m[i] as f64, v[i] as f64, g[i] as f64, (0.0, 0.0, 0.0)))
                .collect();
            let (want_t, want_m, want_v) = (row(&case.param, t), row(&case.exp_avg, t), row(&case.exp_avg_sq, t));
            check(&format!("m after step {}", t + 1), &km, &want_m, &bounds.iter().map(|b| b.0).collect::<Vec<_>>());
            check(&format!("v after step {}", t + 1), &kv, &want_v, &bounds.iter().map(|b| b.1).collect::<Vec<_>>());
            check(&format!("θ after step {}", t + 1), &kt, &want_t, &bounds.iter().map(|b| b.2).collect::<Vec<_>>());
            (theta, m, v) = (want_t, want_m, want_v);
        }
        println!(
            "{device} {}: per step, {} of {} values equal torch's bit for bit, the largest |Δ| is {:.3} of its bound",
            case.name,
            same.get(),
            compared.get(),
            worst.get()
        );
        worst.set(0.0);
        if case.steps == 1 {
            continue;
        }
        // The whole run from the same start, the bounds carried from step to step.
        let (mut kt, mut km, mut kv) = (case.p0.clone(), case.m0.clone(), case.v0.clone());
        let mut carried = vec![(0.0, 0.0, 0.0); n];
        let (mut theta, mut m, mut v) = (case.p0.clone(), case.m0.clone(), case.v0.clone());
        for t in 0..case.steps {
            let c = Constants::new(&case.hyper, case.first_step + t as u64);
            let g = row(&case.grads, t);
            for i in 0..n {
                carried[i] = step_bounds(&c, theta[i] as f64, m[i] as f64, v[i] as f64, g[i] as f64, carried[i]);
            }
            [kt, km, kv] = run(&kt, &km, &kv, t);
            (theta, m, v) = (row(&case.param, t), row(&case.exp_avg, t), row(&case.exp_avg_sq, t));
        }
        check("m after the run", &km, &m, &carried.iter().map(|b| b.0).collect::<Vec<_>>());
        check("v after the run", &kv, &v, &carried.iter().map(|b| b.1).collect::<Vec<_>>());
        check("θ after the run", &kt, &theta, &carried.iter().map(|b| b.2).collect::<Vec<_>>());
        println!(
            "{device} {}: after {} steps, the largest |Δ| is {:.3} of its bound",
            case.name,
            case.steps,
            worst.get()
        );
    }
}

/// Gradients for step `t`, the same on every device.
fn grads(shapes: &[Vec<usize>], dtypes: &[DType], t: u64, device: &Device) -> Vec<Tensor> {
    shapes
        .iter()
        .zip(dtypes)
        .enumerate()
        .map(|(j, (s, &d))| Tensor::randn(s, 0.0, 0.3, 1000 * t + j as u64, d, device).unwrap())
        .collect()
}

/// On the CPU: clipping engages; elsewhere: the device's states follow the CPU's.
fn every_device_follows_the_cpu_over_100_steps(device: &Device) {
    // 18 tensors (more than one shader group), odd sizes, every gradient and working dtype,
    // EWC on some, clipping that engages.
    let shapes: Vec<Vec<usize>> = (0..18).map(|j| vec![[1, 7, 1000, 4097, 33, 2][j % 6], 1 + j % 3]).collect();
    let grad_dtypes: Vec<DType> = (0..18).map(|j| DType::ALL[j % 3]).collect();
    let working: Vec<Option<DType>> =
        (0..18).map(|j| [None, Some(DType::BF16), Some(DType::F16), Some(DType::F32)][j % 4]).collect();
    let h = AdamWHyper {
        lr: 1e-2,
        max_grad_norm: Some(5.0),
        penalty: Penalty::Ewc { lambda: 0.5 },
        ..AdamWHyper::default()
    };
    let steps = 100u64;
    let run = |device: &Device| {
        let mut states: Vec<State> = shapes
            .iter()
            .enumerate()
            .map(|(j, s)| State::new(s, 10 + j as u64, working[j], j % 2 == 0, device))
            .collect();
        let mut clipped = 0;
        for t in 1..=steps {
            let report = step(&mut states, &grads(&shapes, &grad_dtypes, t, device), &h, t).unwrap();
            assert!(!report.skipped);
            clipped += (report.clip_scale < 1.0) as usize;
        }
        (states, clipped)
    };
    let (cpu, clipped) = run(&Device::Cpu);
    assert!(clipped > 0, "the test means clipping to engage");
    if !device.is_cpu() {
        let (other, _) = run(device);
        for (j, (a, b)) in cpu.iter().zip(&other).enumerate() {
            // Each step rounds θ, m and v a few times in f32 (u = 2⁻²⁴) and the norms differ
            // in summation order; over 100 steps the states may drift by 100·16·u relative
            // to their size, plus as much of one learning-rate-sized update.
            let bound = |x: f32| steps as f32 * 16.0 * f32::EPSILON / 2.0 * (x.abs() + h.lr as f32);
            for (name, x, y) in [("master", &a.master, &b.master), ("m", &a.m, &b.m), ("v", &a.v, &b.v)] {
                let (x, y) = (x.to_vec::<f32>().unwrap(), y.to_vec::<f32>().unwrap());
                for (i, (p, q)) in x.iter().zip(&y).enumerate() {
                    assert!((p - q).abs() <= bound(*p), "{device} tensor {j} {name}[{i}]: cpu {p}, {device} {q}");
                }
            }
            if let (Some(x), Some(y)) = (&a.working, &b.working) {
                let (x, y) = (x.to_vec_f32().unwrap(), y.to_vec_f32().unwrap());
                let u = x.len().min(1) as f32 * a.working.as_ref().unwrap().dtype().unit_roundoff() as f32;
                for (i, (p, q)) in x.iter().zip(&y).enumerate() {
                    assert!(
                        (p - q).abs() <= bound(*p) + 2.0 * u * p.abs(),
                        "{device} tensor {j} working[{i}]: {p} vs {q}"
                    );
                }
            }
        }
    }
}

fn clipping_uses_the_global_norm_and_a_nonfinite_gradient_skips_the_step(device: &Device) {
    let shapes = [vec![3, 5], vec![17]];
    let mut states: Vec<State> =
        shapes.iter().enumerate().map(|(j, s)| State::new(s, j as u64, None, false, device)).collect();
    let g = grads(&shapes, &[DType::F32, DType::BF16], 1, device);
    let direct: f64 =
        g.iter().flat_map(|t| t.to_vec_f32().unwrap()).map(|x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
    let h = AdamWHyper { max_grad_norm: Some(0.5), ..AdamWHyper::default() };
    let report = step(&mut states, &g, &h, 1).unwrap();
    assert!((report.grad_norm as f64 - direct).abs() <= 1e-5 * direct, "{device}: {} vs {direct}", report.grad_norm);
    assert!((report.clip_scale as f64 - 0.5 / (direct + 1e-6)).abs() <= 1e-5, "{device}");
    // A NaN in one gradient: nothing changes, and the report says so.
    let before: Vec<Vec<u8>> =
        states.iter().flat_map(|s| [&s.master, &s.m, &s.v]).map(|t| t.to_bytes().unwrap()).collect();
    let mut bad = g[1].to_vec_f32().unwrap();
    bad[3] = f32::NAN;
    let g = [g[0].clone(), Tensor::from_f32(&bad, &[17], DType::BF16, device).unwrap()];
    let report = step(&mut states, &g, &h, 2).unwrap();
    assert!(report.skipped, "{device}");
    let after: Vec<Vec<u8>> =
        states.iter().flat_map(|s| [&s.master, &s.m, &s.v]).map(|t| t.to_bytes().unwrap()).collect();
    assert_eq!(before, after, "{device}: a skipped step writes nothing");
}

fn the_ewc_term_is_the_gradient_of_its_penalty(device: &Device) {
    // With β1 = 0 the first moment after a step is the gradient the step used; with a zero
    // loss gradient that is the penalty's: ∂/∂θ [λ/2 Σ F (θ − θ*)²] = λ F (θ − θ*).
    let lambda = 0.7f64;
    for (penalty, with_fisher) in [(Penalty::Ewc { lambda }, true), (Penalty::L2Anchor { lambda }, false)] {
        let shape = [40];
        let mut s = [State::new(&shape, 3, None, true, device)];
        if !with_fisher {
            s[0].fisher = None;
        }
        let theta: Vec<f64> = s[0].master.to_vec::<f32>().unwrap().iter().map(|&x| x as f64).collect();
        let anchor: Vec<f64> =
            s[0].anchor.as_ref().unwrap().to_vec::<f32>().unwrap().iter().map(|&x| x as f64).collect();
        let fisher: Vec<f64> = match &s[0].fisher {
            Some(f) => f.to_vec::<f32>().unwrap().iter().map(|&x| x as f64).collect(),
            None => vec![1.0; 40],
        };
        let penalty_value = |th: &[f64]| -> f64 {
            th.iter().zip(&anchor).zip(&fisher).map(|((t, a), f)| 0.5 * lambda * f * (t - a) * (t - a)).sum()
        };
        let h = AdamWHyper { beta1: 0.0, weight_decay: 0.0, penalty, ..AdamWHyper::default() };
        let zero = Tensor::zeros(&shape, DType::F32, device).unwrap();
        step(&mut s, &[zero], &h, 1).unwrap();
        let used = s[0].m.to_vec::<f32>().unwrap();
        for i in 0..40 {
            let step_h = 1e-4;
            let (mut up, mut down) = (theta.clone(), theta.clone());
            up[i] += step_h;
            down[i] -= step_h;
            let fd = (penalty_value(&up) - penalty_value(&down)) / (2.0 * step_h);
            assert!(
                (used[i] as f64 - fd).abs() <= 1e-5 * (1.0 + fd.abs()),
                "{device} {penalty:?} [{i}]: {} vs {fd}",
                used[i]
            );
        }
    }
}

fn fisher_accumulates_the_running_mean_of_squared_gradients(device: &Device) {
    let mut fisher = Tensor::zeros(&[3, 11], DType::F32, device).unwrap();
    let samples: Vec<Tensor> = (0..5)
        .map(|k| Tensor::randn(&[3, 11], 0.0, 1.0, 50 + k, DType::ALL[k as usize % 3], device).unwrap())
        .collect();
    for (k, g) in samples.iter().enumerate() {
        fisher_accumulate(&mut fisher, g, k as u64 + 1).unwrap();
    }
    let got = fisher.to_vec::<f32>().unwrap();
    let hosts: Vec<Vec<f32>> = samples.iter().map(|g| g.to_vec_f32().unwrap()).collect();
    for (i, &x) in got.iter().enumerate() {
        let want: f64 = hosts.iter().map(|g| (g[i] as f64).powi(2)).sum::<f64>() / 5.0;
        assert!((x as f64 - want).abs() <= 1e-5 * (1.0 + want), "{device} [{i}]: {x} vs {want}");
    }
}

fn bad_input_is_an_error(device: &Device) {
    let mut s = [State::new(&[4], 1, None, false, device)];
    let g = [Tensor::zeros(&[4], DType::F32, device).unwrap()];
    let bad = |h: AdamWHyper, t: u64, s: &mut [State]| matches!(step(s, &g, &h, t), Err(Error::InvalidArgument(_)));
    assert!(bad(AdamWHyper { lr: -1.0, ..AdamWHyper::default() }, 1, &mut s));
    assert!(bad(AdamWHyper { beta1: 1.0, ..AdamWHyper::default() }, 1, &mut s));
    assert!(bad(AdamWHyper { beta2: -0.1, ..AdamWHyper::default() }, 1, &mut s));
    assert!(bad(AdamWHyper { eps: 0.0, ..AdamWHyper::default() }, 1, &mut s));
    assert!(bad(AdamWHyper::default(), 0, &mut s));
    let wrong_shape = [Tensor::zeros(&[5], DType::F32, device).unwrap()];
    assert!(matches!(step(&mut s, &wrong_shape, &AdamWHyper::default(), 1), Err(Error::Shape(_))));
    s[0].m = Tensor::zeros(&[4], DType::BF16, device).unwrap();
    assert!(matches!(step(&mut s, &g, &AdamWHyper::default(), 1), Err(Error::DType(_))));
    let mut f = Tensor::zeros(&[4], DType::F32, device).unwrap();
    assert!(matches!(fisher_accumulate(&mut f, &g[0], 0), Err(Error::InvalidArgument(_))));
    if !device.is_cpu() {
        let mut s = [State::new(&[4], 1, None, false, device)];
        let g = [Tensor::zeros(&[4], DType::F32, &Device::Cpu).unwrap()];
        assert!(matches!(step(&mut s, &g, &AdamWHyper::default(), 1), Err(Error::DeviceMismatch(_))));
    }
}

mod driver {
    use super::*;
    use kiln::train::AdamW;

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("kiln-test-{}-{name}", std::process::id()))
    }

    fn params(device: &Device) -> Vec<(String, Tensor)> {
        vec![
            ("layers.0.q".to_string(), Tensor::randn(&[8, 5], 0.0, 1.0, 1, DType::BF16, device).unwrap()),
            ("layers.0.v".to_string(), Tensor::randn(&[13], 0.0, 1.0, 2, DType::F32, device).unwrap()),
        ]
    }

    /// A model's AdamW state saved from PyTorch by the documented lines resumes here: one more
    /// step with torch's next gradients lands where torch's did, within both sides'
    /// roundings of that step.
    fn resumes_from_torch_moments(device: &Device) {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/adamw_torch_moments");
        let params = kiln::io::load(format!("{dir}/params.safetensors"), device).unwrap();
        let next = kiln::io::SafetensorsFile::open(format!("{dir}/next.safetensors")).unwrap();
        let meta = next.metadata().unwrap();
        let f = |k: &str| meta[k].parse::<f64>().unwrap();
        let hyper = AdamWHyper {
            lr: f("lr"),
            beta1: f("beta1"),
            beta2: f("beta2"),
            eps: f("eps"),
            weight_decay: f("weight_decay"),
            ..AdamWHyper::default()
        };
        let mut names: Vec<&String> = params.keys().collect();
        names.sort();
        let named: Vec<(&str, &Tensor)> = names.iter().map(|n| (n.as_str(), &params[*n])).collect();
        let path = format!("{dir}/moments.safetensors");
        let mut opt = AdamW::from_torch_moments(&named, &path, hyper).unwrap();
        assert_eq!(opt.steps(), 3);
        let grads: Vec<Tensor> = names.iter().map(|n| next.tensor(&format!("grad.{n}"), device).unwrap()).collect();
        let before: Vec<[Vec<f32>; 3]> =
            opt.params().iter().map(|p| [&p.master, &p.m, &p.v].map(|t| t.to_vec::<f32>().unwrap())).collect();
        opt.step(&grads.iter().collect::<Vec<_>>(), &mut []).unwrap();
        let c = Constants::new(&hyper, 4);
        for (((name, p), [theta, m, v]), g) in names.iter().zip(opt.params()).zip(&before).zip(&grads) {
            let got = p.master.to_vec::<f32>().unwrap();
            let want = next.tensor(name, &Device::Cpu).unwrap().to_vec::<f32>().unwrap();
            let g = g.to_vec::<f32>().unwrap();
            for i in 0..got.len() {
                let (.., tol) =
                    step_bounds(&c, theta[i] as f64, m[i] as f64, v[i] as f64, g[i] as f64, (0.0, 0.0, 0.0));
                let err = (got[i] as f64 - want[i] as f64).abs();
                assert!(err <= tol, "{device} {name}[{i}]: kiln {} torch {} (|Δ| {err:e} > {tol:e})", got[i], want[i]);
            }
        }
        let missing = [("nothing.weight", &params[names[0]])];
        assert!(AdamW::from_torch_moments(&missing, &path, hyper).is_err(), "a name the file lacks is an error");
    }

    fn run(opt: &mut AdamW, working: &mut [Tensor], from: u64, to: u64, device: &Device) {
        for t in from..to {
            let g: Vec<Tensor> = working
                .iter()
                .enumerate()
                .map(|(j, w)| Tensor::randn(w.shape(), 0.0, 0.5, 7 * t + j as u64, DType::F32, device).unwrap())
                .collect();
            let grads: Vec<&Tensor> = g.iter().collect();
            let mut refs: Vec<&mut Tensor> = working.iter_mut().collect();
            opt.step(&grads, &mut refs).unwrap();
            if t % 4 == 0 {
                opt.accumulate_fisher(&grads).unwrap();
            }
            if t == 6 {
                opt.set_anchor().unwrap();
            }
        }
    }

    fn a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(device: &Device) {
        let h = AdamWHyper { penalty: Penalty::Ewc { lambda: 0.3 }, max_grad_norm: Some(1.0), ..AdamWHyper::default() };
        let named = params(device);
        let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut whole = AdamW::new(&refs, h).unwrap();
        let mut working: Vec<Tensor> = named.iter().map(|(_, t)| t.clone()).collect();
        run(&mut whole, &mut working, 1, 21, device);

        let mut first = AdamW::new(&refs, h).unwrap();
        let mut w2: Vec<Tensor> = named.iter().map(|(_, t)| t.clone()).collect();
        run(&mut first, &mut w2, 1, 11, device);
        let path = temp(&format!("resume-{device}.safetensors"));
        first.save(&path).unwrap();
        let mut resumed = AdamW::load(&path, device).unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!(resumed.steps(), 10);
        run(&mut resumed, &mut w2, 11, 21, device);

        let bytes = |o: &AdamW| -> Vec<Vec<u8>> {
            o.params()
                .iter()
                .flat_map(|p| [Some(&p.master), Some(&p.m), Some(&p.v), p.anchor.as_ref(), p.fisher.as_ref()])
                .map(|t| t.map(|t| t.to_bytes().unwrap()).unwrap_or_default())
                .collect()
        };
        assert_eq!(bytes(&whole), bytes(&resumed), "{device}: resumed state differs");
        for (a, b) in working.iter().zip(&w2) {
            assert_eq!(a.to_bytes().unwrap(), b.to_bytes().unwrap(), "{device}: working copies differ");
        }
        assert_eq!(whole.params()[0].fisher_samples, 5);
    }

    #[test]
    fn a_bad_state_file_is_an_error_that_says_why() {
        let named = params(&Device::Cpu);
        let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let opt = AdamW::new(&refs, AdamWHyper::default()).unwrap();
        let path = temp("bad.safetensors");
        opt.save(&path).unwrap();
        let good = std::fs::read(&path).unwrap();
        std::fs::write(&path, &good[..good.len() / 2]).unwrap();
        assert!(matches!(AdamW::load(&path, &Device::Cpu), Err(Error::Io(_))), "truncated");
        std::fs::write(&path, b"not a safetensors file").unwrap();
        assert!(matches!(AdamW::load(&path, &Device::Cpu), Err(Error::Io(_))), "garbage");
        std::fs::remove_file(&path).ok();
        assert!(matches!(AdamW::load(&path, &Device::Cpu), Err(Error::Io(_))), "missing");
        // Names must be unique; the step takes one gradient per parameter.
        let dup = [("a", &named[0].1), ("a", &named[0].1)];
        assert!(matches!(AdamW::new(&dup, AdamWHyper::default()), Err(Error::InvalidArgument(_))));
        let mut opt = opt;
        assert!(matches!(opt.step(&[&named[0].1], &mut []), Err(Error::InvalidArgument(_))));
        // A state step() would refuse is not saved, and what was saved stays as it was.
        opt.save(&path).unwrap();
        let saved = std::fs::read(&path).unwrap();
        for bad in [
            AdamWHyper { lr: f64::NAN, ..AdamWHyper::default() },
            AdamWHyper { beta2: 1.0, ..AdamWHyper::default() },
            AdamWHyper { eps: 0.0, ..AdamWHyper::default() },
            AdamWHyper { max_grad_norm: Some(f64::INFINITY), ..AdamWHyper::default() },
        ] {
            let mut broken = opt.clone();
            broken.hyper = bad;
            assert!(matches!(broken.save(&path), Err(Error::InvalidArgument(_))), "{bad:?} saved");
            assert_eq!(std::fs::read(&path).unwrap(), saved, "{bad:?}: the saved state changed");
        }
        std::fs::remove_file(&path).ok();
    }

    device_tests!(a_resumed_run_equals_an_uninterrupted_one_bit_for_bit, resumes_from_torch_moments);
}

/// On the CPU: unbiased and seeded; elsewhere: the CPU's rounding, bit for bit.
fn stochastic_rounding_is_unbiased_seeded_and_the_same_on_every_device(device: &Device) {
    // θ = 1 + 2⁻⁹ sits a quarter of the way from bf16 1.0 to the next value, 1 + 2⁻⁷. With
    // lr = 0 the master does not move, so the working copy is just θ rounded.
    let n = 20000;
    let x = 1.0 + 2f32.powi(-9);
    let (lo, hi) = (1.0f32, 1.0 + 2f32.powi(-7));
    let h = AdamWHyper { lr: 0.0, stochastic_rounding: Some(42), ..AdamWHyper::default() };
    let round = |device: &Device, h: &AdamWHyper| {
        let mut s = [State {
            master: Tensor::full(&[n], x, DType::F32, device).unwrap(),
            m: Tensor::zeros(&[n], DType::F32, device).unwrap(),
            v: Tensor::zeros(&[n], DType::F32, device).unwrap(),
            working: Some(Tensor::zeros(&[n], DType::BF16, device).unwrap()),
            anchor: None,
            fisher: None,
        }];
        let g = [Tensor::full(&[n], 0.1, DType::F32, device).unwrap()];
        step(&mut s, &g, h, 1).unwrap();
        s[0].working.as_ref().unwrap().to_bytes().unwrap()
    };
    let cpu = round(&Device::Cpu, &h);
    if device.is_cpu() {
        let values: Vec<f32> = cpu.chunks(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
        assert!(values.iter().all(|&v| v == lo || v == hi), "every value is a neighbour of θ");
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let sigma = (hi - lo) as f64 * (0.25f64 * 0.75 / n as f64).sqrt();
        assert!((mean - x as f64).abs() <= 5.0 * sigma, "mean {mean} vs θ {x} (σ {sigma})");
        assert_eq!(round(&Device::Cpu, &h), cpu, "the same seed gives the same rounding");
        assert_ne!(
            round(&Device::Cpu, &AdamWHyper { stochastic_rounding: Some(43), ..h }),
            cpu,
            "another seed another"
        );
    } else {
        assert_eq!(round(device, &h), cpu, "{device}: integer hashing makes the rounding identical");
    }
    // f16 working copies round to nearest only.
    let mut s = [State::new(&[4], 1, Some(DType::F16), false, device)];
    let g = [Tensor::zeros(&[4], DType::F32, device).unwrap()];
    assert!(matches!(step(&mut s, &g, &h, 1), Err(Error::Unsupported(_))));
}

device_tests!(
    follows_torch_adamw,
    every_device_follows_the_cpu_over_100_steps,
    clipping_uses_the_global_norm_and_a_nonfinite_gradient_skips_the_step,
    the_ewc_term_is_the_gradient_of_its_penalty,
    fisher_accumulates_the_running_mean_of_squared_gradients,
    bad_input_is_an_error,
    stochastic_rounding_is_unbiased_seeded_and_the_same_on_every_device,
);
