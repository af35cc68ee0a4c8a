//! API misuse: every public op called as a hostile or careless user would call it (wrong
//! ranks, shapes, dtypes and devices; zero dimensions; dimensions whose products overflow or
//! whose outputs no memory holds; non-finite values) must answer `Err`, or the documented
//! result, never panic or abort, and answer the same on every device as on the CPU.
//!
//! The walk for each backend runs in a child process (this test binary, re-run), so an abort
//! (an allocation the process cannot survive) fails the test with the case it happened in;
//! inside the child each case runs under `catch_unwind`, so one panic names its case and
//! the walk goes on.

mod common;

use common::Backend;
use kiln::model::{Llama, LoadOptions, StepOptions, TrainSequence, Trainable};
use kiln::ops::attention::{AttentionOptions, AttentionOutput, DecodeOptions, KvCache, attention_decode};
use kiln::ops::lora::{AdapterSet, BaseWeight, LoraLinear, lora_backward, lora_batched, lora_forward, merge, unmerge};
use kiln::ops::loss::{Head, LinearCrossEntropyOptions};
use kiln::ops::optim::{AdamWHyper, ParamSlot, adamw_step, fisher_accumulate};
use kiln::ops::quant::{Nf4Absmax, Nf4State};
use kiln::ops::rope::{RopeConfig, RopeScaling};
use kiln::ops::{self, MatmulOptions, QTensor, QuantFormat};
use kiln::train::AdamW;
use kiln::{DType, Device, Error, Tensor};
use std::panic::{AssertUnwindSafe, catch_unwind};

type Run = Box<dyn Fn(&Device) -> kiln::Result<Vec<Tensor>>>;

/// What a case must give on the CPU (every other device must then give the same).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// An `Err` (any kind: the message is checked to be non-empty).
    Refused,
    /// An `Ok`, whose outputs are checked where the case computes them.
    Accepted,
    /// The documented result is either; it must only not panic and agree across devices.
    Either,
}

struct Case {
    name: String,
    expect: Expect,
    run: Run,
}

fn case(name: &str, expect: Expect, run: impl Fn(&Device) -> kiln::Result<Vec<Tensor>> + 'static) -> Case {
    Case { name: name.to_string(), expect, run: Box::new(run) }
}

use Expect::{Accepted, Either, Refused};

/// An empty dimension beside two whose product overflows usize on its own.
const HUGE: usize = 1 << 40;
/// Outputs of `WIDE × WIDE` elements (4 TiB of f32) that no memory holds.
const WIDE: usize = 1 << 20;
const NAN: f32 = f32::NAN;

fn z(shape: &[usize], d: &Device) -> kiln::Result<Tensor> {
    Tensor::zeros(shape, DType::F32, d)
}

fn zt(shape: &[usize], dtype: DType, d: &Device) -> kiln::Result<Tensor> {
    Tensor::zeros(shape, dtype, d)
}

/// Small integers (exact in every dtype and every accumulation order).
fn ints(shape: &[usize], d: &Device) -> kiln::Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|i| ((i * 7) % 5) as f32 - 2.0).collect();
    Tensor::from_f32(&v, shape, DType::F32, d)
}

/// A u32 ids tensor.
fn ids(values: &[u32], shape: &[usize], d: &Device) -> kiln::Result<Tensor> {
    Tensor::from_slice(values, shape, d)
}

/// The GGUF fixture gguf-py wrote (tests/fixtures/make_gguf.py).
fn gguf() -> kiln::Result<kiln::GgufFile> {
    kiln::GgufFile::open(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kiln.gguf"))
}

/// One training step of the tiny Llama fixture (tests/fixtures/make_llama.py), full
/// fine-tuning; the outputs are the loss and the gradients.
fn train(batch: &[TrainSequence], options: StepOptions, d: &Device) -> kiln::Result<Vec<Tensor>> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llama/tiny");
    let model = Llama::load(dir, &LoadOptions::new(d))?;
    let out = model.train_step(batch, Trainable::Full, &options)?;
    let mut all = vec![Tensor::from_f32(&[out.loss], &[1], DType::F32, d)?];
    all.extend(out.grads.into_values());
    Ok(all)
}

fn seq(ids: &[u32], targets: &[i32]) -> TrainSequence {
    TrainSequence { ids: ids.to_vec(), targets: targets.to_vec() }
}

/// Positions, all 0, of `shape`.
fn pos(shape: &[usize], d: &Device) -> kiln::Result<Tensor> {
    Tensor::zeros(shape, DType::U32, d)
}

fn full(shape: &[usize], value: f32, d: &Device) -> kiln::Result<Tensor> {
    Tensor::full(shape, value, DType::F32, d)
}

fn dense<'a>(base: &'a Tensor, a: &'a Tensor, b: &'a Tensor) -> LoraLinear<'a> {
    LoraLinear { base: BaseWeight::Dense(base), bias: None, a, b, scale: 1.0, dropout: None }
}

fn attn(q: &Tensor, k: &Tensor, v: &Tensor, o: &AttentionOptions) -> kiln::Result<Vec<Tensor>> {
    let out = ops::attention::attention(q, k, v, o)?;
    Ok(vec![out.o, out.lse])
}

fn tgt(t: &[i32], d: &Device) -> kiln::Result<Tensor> {
    Tensor::from_slice(t, &[t.len()], d)
}

fn ce(logits: &Tensor, targets: &Tensor) -> kiln::Result<Vec<Tensor>> {
    let out = ops::cross_entropy(logits, targets)?;
    Ok(vec![out.loss, out.dlogits])
}

fn lce_opts() -> LinearCrossEntropyOptions {
    LinearCrossEntropyOptions::default().head_grad()
}

fn lce(h: &Tensor, w: &Tensor, targets: &Tensor, o: LinearCrossEntropyOptions) -> kiln::Result<Vec<Tensor>> {
    let out = ops::linear_cross_entropy(h, Head::Dense(w), targets, o)?;
    Ok([out.loss, out.dh].into_iter().chain(out.dw).collect())
}

fn opts(causal: bool, scale: Option<f32>, seq_lens: Option<Vec<usize>>) -> AttentionOptions {
    AttentionOptions { causal, scale, seq_lens }
}

fn norm(x: &Tensor, w: &Tensor, eps: f32) -> kiln::Result<Vec<Tensor>> {
    let out = ops::rms_norm(x, w, eps)?;
    Ok(vec![out.y, out.rstd])
}

fn norm_back(dy: &Tensor, x: &Tensor, w: &Tensor, rstd: &Tensor) -> kiln::Result<Vec<Tensor>> {
    let g = ops::rms_norm_backward(dy, x, w, rstd)?;
    Ok(vec![g.dx, g.dw])
}

fn step_one(master: &mut Tensor, grad: &Tensor, h: &AdamWHyper, step: u64) -> kiln::Result<Vec<Tensor>> {
    let d = master.device();
    let (mut m, mut v) = (z(master.shape(), &d)?, z(master.shape(), &d)?);
    let mut slots = [ParamSlot { master, m: &mut m, v: &mut v, grad, working: None, anchor: None, fisher: None }];
    adamw_step(&mut slots, h, step)?;
    Ok(vec![m, v])
}

fn cases() -> Vec<Case> {
    let mut all = vec![
        // Tensors.
        case("from_slice: count ≠ shape", Refused, |d| Ok(vec![Tensor::from_slice(&[1f32, 2.0], &[3], d)?])),
        case("from_f32: overflowing shape", Refused, |d| {
            Ok(vec![Tensor::from_f32(&[], &[HUGE, HUGE, 2], DType::F32, d)?])
        }),
        case("zeros: overflowing shape", Refused, |d| Ok(vec![z(&[usize::MAX, 2], d)?])),
        case("zeros: more than any memory", Refused, |d| Ok(vec![z(&[WIDE, WIDE], d)?])),
        case("zeros: empty beside huge", Accepted, |d| Ok(vec![z(&[1 << 32, 0, 1 << 31], d)?])),
        case("zeros: empty beside an overflowing product", Refused, |d| Ok(vec![z(&[HUGE, 0, HUGE], d)?])),
        case("full: NaN", Accepted, |d| Ok(vec![full(&[3], NAN, d)?])),
        case("rand: low > high", Either, |d| Ok(vec![Tensor::rand(&[4], 1.0, 0.0, 1, DType::F32, d)?])),
        case("randn: NaN std", Either, |d| Ok(vec![Tensor::randn(&[4], 0.0, NAN, 1, DType::F32, d)?])),
        case("reshape: wrong count", Refused, |d| Ok(vec![ints(&[2, 3], d)?.reshape(&[4, 2])?])),
        case("reshape: overflowing", Refused, |d| Ok(vec![z(&[0], d)?.reshape(&[HUGE, HUGE, 0, 3])?])),
        case("reshape: to empty beside huge", Accepted, |d| Ok(vec![z(&[0, 4], d)?.reshape(&[HUGE, 0])?])),
        case("to_dtype: empty", Accepted, |d| Ok(vec![z(&[0, 3], d)?.to_dtype(DType::BF16)?])),
        case("to_dtype: NaN and inf", Accepted, |d| {
            Ok(vec![Tensor::from_f32(&[NAN, f32::INFINITY, 1e30, -7e4], &[4], DType::F32, d)?.to_dtype(DType::F16)?])
        }),
        case("to_vec: wrong element type", Refused, |d| {
            z(&[2], d)?.to_vec::<half::bf16>()?;
            Ok(vec![])
        }),
        // Elementwise.
        case("add: shapes differ", Refused, |d| Ok(vec![ops::add(&z(&[2, 3], d)?, &z(&[3, 2], d)?)?])),
        case("add: dtypes differ", Refused, |d| Ok(vec![ops::add(&z(&[2], d)?, &zt(&[2], DType::BF16, d)?)?])),
        case("add: empty beside huge", Accepted, |d| Ok(vec![ops::add(&z(&[HUGE, 0], d)?, &z(&[HUGE, 0], d)?)?])),
        case("mul: rank 0", Accepted, |d| Ok(vec![ops::mul(&ints(&[], d)?, &ints(&[], d)?)?])),
        case("scale: NaN", Refused, |d| Ok(vec![ops::scale(&ints(&[3], d)?, NAN)?])),
        case("sum_rows: rank 0", Refused, |d| Ok(vec![ops::sum_rows(&ints(&[], d)?)?])),
        case("sum_rows: empty rows beside huge", Accepted, |d| Ok(vec![ops::sum_rows(&z(&[0, HUGE, 0], d)?)?])),
        case("sum_rows: output bytes past usize", Refused, |d| {
            Ok(vec![ops::sum_rows(&z(&[1 << 32, 1 << 31, 0], d)?)?])
        }),
        case("sum_rows: empty rows", Accepted, |d| Ok(vec![ops::sum_rows(&z(&[5, 0], d)?)?])),
        case("sum_rows: output no memory holds", Refused, |d| Ok(vec![ops::sum_rows(&z(&[WIDE, WIDE, 0], d)?)?])),
        case("cast: empty", Accepted, |d| Ok(vec![ops::cast(&z(&[0], d)?, DType::F16)?])),
        case("add_bias: rank-2 bias", Refused, |d| Ok(vec![ops::add_bias(&z(&[2, 3], d)?, &z(&[1, 3], d)?)?])),
        case("add_bias: wrong width", Refused, |d| Ok(vec![ops::add_bias(&z(&[2, 3], d)?, &z(&[2], d)?)?])),
        case("add_bias: rank-0 x", Refused, |d| Ok(vec![ops::add_bias(&z(&[], d)?, &z(&[1], d)?)?])),
        case("dropout: p = 1", Refused, |d| Ok(vec![ops::dropout(&ints(&[4], d)?, 1.0, 1)?])),
        case("dropout: p NaN", Refused, |d| Ok(vec![ops::dropout(&ints(&[4], d)?, NAN, 1)?])),
        case("dropout: p < 0", Refused, |d| Ok(vec![ops::dropout(&ints(&[4], d)?, -0.5, 1)?])),
        case("dropout: empty", Accepted, |d| Ok(vec![ops::dropout(&z(&[0, 8], d)?, 0.5, 1)?])),
        // Rotary embeddings.
        case("rope: odd head_dim", Refused, |d| {
            Ok(vec![ops::rope(&z(&[1, 2, 1, 5], d)?, &pos(&[1, 2], d)?, &RopeConfig::default())?])
        }),
        case("rope: rotary_dim past head_dim", Refused, |d| {
            Ok(vec![ops::rope(&z(&[1, 2, 1, 4], d)?, &pos(&[1, 2], d)?, &RopeConfig::default().with_rotary_dim(6))?])
        }),
        case("rope: odd rotary_dim", Refused, |d| {
            Ok(vec![ops::rope(&z(&[1, 2, 1, 4], d)?, &pos(&[1, 2], d)?, &RopeConfig::default().with_rotary_dim(3))?])
        }),
        case("rope: positions not [batch, seq]", Refused, |d| {
            Ok(vec![ops::rope(&z(&[1, 2, 1, 4], d)?, &pos(&[2, 1], d)?, &RopeConfig::default())?])
        }),
        case("rope: f32 positions", Refused, |d| {
            Ok(vec![ops::rope(&z(&[1, 2, 1, 4], d)?, &z(&[1, 2], d)?, &RopeConfig::default())?])
        }),
        case("rope: i32 positions", Refused, |d| {
            Ok(vec![ops::rope(&z(&[1, 2, 1, 4], d)?, &zt(&[1, 2], DType::I32, d)?, &RopeConfig::default())?])
        }),
        case("rope: u32 x", Refused, |d| {
            Ok(vec![ops::rope(&zt(&[1, 2, 1, 4], DType::U32, d)?, &pos(&[1, 2], d)?, &RopeConfig::default())?])
        }),
        case("rope: rank-3 x", Refused, |d| {
            Ok(vec![ops::rope(&z(&[2, 1, 4], d)?, &pos(&[1, 2], d)?, &RopeConfig::default())?])
        }),
        case("rope: NaN theta", Refused, |d| {
            Ok(vec![ops::rope(&z(&[1, 2, 1, 4], d)?, &pos(&[1, 2], d)?, &RopeConfig::new(f64::NAN))?])
        }),
        case("rope: theta 0", Refused, |d| {
            Ok(vec![ops::rope(&z(&[1, 2, 1, 4], d)?, &pos(&[1, 2], d)?, &RopeConfig::new(0.0))?])
        }),
        case("rope: linear factor 0", Refused, |d| {
            let cfg = RopeConfig::default().with_scaling(RopeScaling::Linear { factor: 0.0 });
            Ok(vec![ops::rope(&z(&[1, 2, 1, 4], d)?, &pos(&[1, 2], d)?, &cfg)?])
        }),
        case("rope_backward: llama3 high_freq_factor = low_freq_factor", Refused, |d| {
            let scaling = RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 2.0,
                high_freq_factor: 2.0,
                original_max_position_embeddings: 8192,
            };
            let cfg = RopeConfig::default().with_scaling(scaling);
            Ok(vec![ops::rope_backward(&z(&[1, 2, 1, 4], d)?, &pos(&[1, 2], d)?, &cfg)?])
        }),
        case("rope: no tokens", Accepted, |d| {
            Ok(vec![ops::rope(&z(&[0, 3, 2, 4], d)?, &pos(&[0, 3], d)?, &RopeConfig::default())?])
        }),
        case("rope: head_dim 0", Accepted, |d| {
            Ok(vec![ops::rope(&z(&[1, 3, 2, 0], d)?, &pos(&[1, 3], d)?, &RopeConfig::default())?])
        }),
        case("rope: empty beside huge", Accepted, |d| {
            Ok(vec![ops::rope(&z(&[HUGE, 0, 2, 4], d)?, &pos(&[HUGE, 0], d)?, &RopeConfig::default())?])
        }),
        // Position 0 rotates by nothing: x comes back bit for bit on every device.
        case("rope: position 0, partial interleaved", Accepted, |d| {
            let cfg = RopeConfig::default().interleaved().with_rotary_dim(2);
            Ok(vec![ops::rope(&ints(&[2, 3, 3, 6], d)?, &pos(&[2, 3], d)?, &cfg)?])
        }),
        case("rope_backward: NaN x propagates", Accepted, |d| {
            let x = Tensor::from_f32(&[NAN, 1.0, 2.0, 3.0], &[1, 1, 1, 4], DType::F32, d)?;
            Ok(vec![ops::rope_backward(&x, &pos(&[1, 1], d)?, &RopeConfig::default())?])
        }),
        // Norm.
        case("rms_norm: eps = 0", Refused, |d| norm(&ints(&[2, 4], d)?, &z(&[4], d)?, 0.0)),
        case("rms_norm: eps < 0", Refused, |d| norm(&ints(&[2, 4], d)?, &z(&[4], d)?, -1e-5)),
        case("rms_norm: eps NaN", Refused, |d| norm(&ints(&[2, 4], d)?, &z(&[4], d)?, NAN)),
        case("rms_norm: eps infinite", Refused, |d| norm(&ints(&[2, 4], d)?, &z(&[4], d)?, f32::INFINITY)),
        case("rms_norm: w of the wrong width", Refused, |d| norm(&ints(&[2, 4], d)?, &z(&[3], d)?, 1e-5)),
        case("rms_norm: rank-2 w", Refused, |d| norm(&ints(&[2, 4], d)?, &z(&[1, 4], d)?, 1e-5)),
        case("rms_norm: rank-0 x", Refused, |d| norm(&z(&[], d)?, &z(&[1], d)?, 1e-5)),
        case("rms_norm: zeros give zeros, rstd 1/√eps", Accepted, |d| norm(&z(&[3, 5], d)?, &ints(&[5], d)?, 0.25)),
        case("rms_norm: no rows beside huge", Accepted, |d| norm(&z(&[HUGE, 0, 4], d)?, &z(&[4], d)?, 1e-5)),
        case("rms_norm: rows of width 0", Accepted, |d| norm(&z(&[3, 0], d)?, &z(&[0], d)?, 0.25)),
        case("rms_norm: bf16 x, f32 w, no rows", Accepted, |d| norm(&zt(&[0, 8], DType::BF16, d)?, &z(&[8], d)?, 1e-5)),
        case("add_rms_norm: residual of another shape", Refused, |d| {
            let out = ops::add_rms_norm(&z(&[2, 4], d)?, &z(&[4, 2], d)?, &z(&[4], d)?, 1e-5)?;
            Ok(vec![out.h, out.y, out.rstd])
        }),
        case("add_rms_norm: residual of another dtype", Refused, |d| {
            let out = ops::add_rms_norm(&z(&[2, 4], d)?, &zt(&[2, 4], DType::F16, d)?, &z(&[4], d)?, 1e-5)?;
            Ok(vec![out.h, out.y, out.rstd])
        }),
        case("add_rms_norm: eps = 0", Refused, |d| {
            let out = ops::add_rms_norm(&z(&[2, 4], d)?, &z(&[2, 4], d)?, &z(&[4], d)?, 0.0)?;
            Ok(vec![out.h, out.y, out.rstd])
        }),
        case("add_rms_norm: exact sums, zero weight", Accepted, |d| {
            let out = ops::add_rms_norm(&ints(&[2, 4], d)?, &ints(&[2, 4], d)?, &z(&[4], d)?, 1e-5)?;
            Ok(vec![out.h, out.y])
        }),
        case("rms_norm_backward: bf16 rstd", Refused, |d| {
            let x = ints(&[2, 4], d)?;
            norm_back(&x, &x, &z(&[4], d)?, &zt(&[2], DType::BF16, d)?)
        }),
        case("rms_norm_backward: rstd of the wrong shape", Refused, |d| {
            let x = ints(&[2, 4], d)?;
            norm_back(&x, &x, &z(&[4], d)?, &z(&[2, 1], d)?)
        }),
        case("rms_norm_backward: dy of another shape", Refused, |d| {
            norm_back(&z(&[4, 2], d)?, &ints(&[2, 4], d)?, &z(&[4], d)?, &z(&[2], d)?)
        }),
        case("rms_norm_backward: dy of another dtype", Refused, |d| {
            norm_back(&zt(&[2, 4], DType::BF16, d)?, &ints(&[2, 4], d)?, &z(&[4], d)?, &z(&[2], d)?)
        }),
        case("rms_norm_backward: w of the wrong width", Refused, |d| {
            let x = ints(&[2, 4], d)?;
            norm_back(&x, &x, &z(&[5], d)?, &z(&[2], d)?)
        }),
        case("rms_norm_backward: no rows give a zero dw", Accepted, |d| {
            let x = z(&[0, 4], d)?;
            norm_back(&x, &x, &ints(&[4], d)?, &z(&[0], d)?)
        }),
        case("rms_norm_backward: zero dy gives zeros", Accepted, |d| {
            norm_back(&z(&[3, 4], d)?, &ints(&[3, 4], d)?, &ints(&[4], d)?, &full(&[3], 0.5, d)?)
        }),
        // Activations.
        case("swiglu: shapes differ", Refused, |d| Ok(vec![ops::swiglu(&z(&[2, 3], d)?, &z(&[3, 2], d)?)?])),
        case("swiglu: dtypes differ", Refused, |d| Ok(vec![ops::swiglu(&z(&[2], d)?, &zt(&[2], DType::F16, d)?)?])),
        case("swiglu: rank 0", Accepted, |d| Ok(vec![ops::swiglu(&z(&[], d)?, &ints(&[], d)?)?])),
        case("swiglu: empty beside huge", Accepted, |d| Ok(vec![ops::swiglu(&z(&[HUGE, 0], d)?, &z(&[HUGE, 0], d)?)?])),
        case("swiglu_backward: u of another shape", Refused, |d| {
            let (dg, du) = ops::swiglu_backward(&z(&[4], d)?, &z(&[4], d)?, &z(&[5], d)?)?;
            Ok(vec![dg, du])
        }),
        case("swiglu_backward: dy of another dtype", Refused, |d| {
            let (dg, du) = ops::swiglu_backward(&zt(&[4], DType::BF16, d)?, &z(&[4], d)?, &z(&[4], d)?)?;
            Ok(vec![dg, du])
        }),
        case("swiglu_backward: empty", Accepted, |d| {
            let (dg, du) = ops::swiglu_backward(&z(&[0, 3], d)?, &z(&[0, 3], d)?, &z(&[0, 3], d)?)?;
            Ok(vec![dg, du])
        }),
        case("gelu: empty", Accepted, |d| Ok(vec![ops::gelu(&zt(&[5, 0], DType::BF16, d)?)?])),
        case("gelu: zeros give zeros", Accepted, |d| Ok(vec![ops::gelu(&z(&[3], d)?)?])),
        case("gelu_backward: shapes differ", Refused, |d| Ok(vec![ops::gelu_backward(&z(&[3], d)?, &z(&[4], d)?)?])),
        case("gelu_backward: dtypes differ", Refused, |d| {
            Ok(vec![ops::gelu_backward(&z(&[3], d)?, &zt(&[3], DType::F16, d)?)?])
        }),
        case("gelu_backward: the slope at 0 is ½", Accepted, |d| {
            Ok(vec![ops::gelu_backward(&full(&[3], 1.0, d)?, &z(&[3], d)?)?])
        }),
        // Matmul.
        case("matmul: rank 1", Refused, |d| Ok(vec![ops::matmul(&z(&[3], d)?, &z(&[3, 2], d)?)?])),
        case("matmul: rank 4", Refused, |d| Ok(vec![ops::matmul(&z(&[1, 1, 2, 3], d)?, &z(&[1, 1, 3, 2], d)?)?])),
        case("matmul: inner dims differ", Refused, |d| Ok(vec![ops::matmul(&z(&[2, 3], d)?, &z(&[4, 2], d)?)?])),
        case("matmul: batches differ", Refused, |d| Ok(vec![ops::matmul(&z(&[2, 2, 3], d)?, &z(&[3, 3, 2], d)?)?])),
        case("matmul: dtypes differ", Refused, |d| {
            Ok(vec![ops::matmul(&z(&[2, 3], d)?, &zt(&[3, 2], DType::BF16, d)?)?])
        }),
        case("matmul: k = 0 gives zeros", Accepted, |d| Ok(vec![ops::matmul(&z(&[3, 0], d)?, &z(&[0, 5], d)?)?])),
        case("matmul: m = 0", Accepted, |d| Ok(vec![ops::matmul(&z(&[0, 4], d)?, &ints(&[4, 5], d)?)?])),
        case("matmul: batch 0 beside huge", Accepted, |d| {
            Ok(vec![ops::matmul(&z(&[0, 1 << 32, 0], d)?, &z(&[0, 0, 1 << 31], d)?)?])
        }),
        case("matmul: empty output past usize", Refused, |d| {
            Ok(vec![ops::matmul(&z(&[0, HUGE, 0], d)?, &z(&[0, 0, HUGE], d)?)?])
        }),
        case("matmul: output no memory holds", Refused, |d| {
            Ok(vec![ops::matmul(&z(&[WIDE, 0], d)?, &z(&[0, WIDE], d)?)?])
        }),
        case("matmul: overflowing output", Refused, |d| Ok(vec![ops::matmul(&z(&[HUGE, 0], d)?, &z(&[0, HUGE], d)?)?])),
        case("matmul_with: nt, k = 0", Accepted, |d| {
            Ok(vec![ops::matmul_with(&z(&[2, 0], d)?, &z(&[3, 0], d)?, MatmulOptions::nt().out_dtype(DType::BF16))?])
        }),
        case("matmul_with: tn, inner differs", Refused, |d| {
            Ok(vec![ops::matmul_with(&z(&[4, 2], d)?, &z(&[3, 5], d)?, MatmulOptions::tn())?])
        }),
        case("matmul: NaN propagates", Accepted, |d| {
            Ok(vec![ops::matmul(&Tensor::from_f32(&[NAN, 1.0], &[1, 2], DType::F32, d)?, &ints(&[2, 2], d)?)?])
        }),
        // Quantized weights.
        case("quantize: NaN weight", Refused, |d| {
            let w = Tensor::from_f32(&[NAN; 32], &[1, 32], DType::F32, d)?;
            QTensor::quantize(&w, QuantFormat::Q8_0)?;
            Ok(vec![])
        }),
        case("quantize: Q8_0 scale past f16", Refused, |d| {
            QTensor::quantize(&full(&[1, 32], 1e9, d)?, QuantFormat::Q8_0)?;
            Ok(vec![])
        }),
        case("quantize: Q4_0 scale past f16", Refused, |d| {
            QTensor::quantize(&full(&[1, 32], 1e7, d)?, QuantFormat::Q4_0)?;
            Ok(vec![])
        }),
        case("quantize: Q4_1 minimum past f16", Refused, |d| {
            QTensor::quantize(&full(&[1, 32], -1e5, d)?, QuantFormat::Q4_1)?;
            Ok(vec![])
        }),
        case("quantize: Q4_1 range past f16", Refused, |d| {
            let v: Vec<f32> = (0..32).map(|j| if j % 2 == 0 { 0.0 } else { 2e6 }).collect();
            QTensor::quantize(&Tensor::from_f32(&v, &[1, 32], DType::F32, d)?, QuantFormat::Q4_1)?;
            Ok(vec![])
        }),
        case("quantize: unaligned in", Refused, |d| {
            QTensor::quantize(&z(&[2, 33], d)?, QuantFormat::Q4_0)?;
            Ok(vec![])
        }),
        case("quantize: unaligned in, Q4_1", Refused, |d| {
            QTensor::quantize(&z(&[2, 33], d)?, QuantFormat::Q4_1)?;
            Ok(vec![])
        }),
        case("quantize: rank 3", Refused, |d| {
            QTensor::quantize(&z(&[1, 2, 64], d)?, QuantFormat::Nf4)?;
            Ok(vec![])
        }),
        case("quantize: in = 0", Accepted, |d| {
            Ok(vec![QTensor::quantize(&z(&[4, 0], d)?, QuantFormat::Q8_0)?.dequantize(DType::F32)?])
        }),
        case("from_ggml_blocks: overflowing shape", Refused, |d| {
            QTensor::from_ggml_blocks(QuantFormat::Q8_0, &[0; 16], &[542_551_296_285_575_048, 32], d)?;
            Ok(vec![])
        }),
        case("from_ggml_blocks: infinite scale", Refused, |d| {
            let mut block = vec![0u8; 34];
            block[..2].copy_from_slice(&0x7c00u16.to_le_bytes());
            QTensor::from_ggml_blocks(QuantFormat::Q8_0, &block, &[1, 32], d)?;
            Ok(vec![])
        }),
        case("from_ggml_blocks: infinite Q4_1 minimum", Refused, |d| {
            let mut block = vec![0u8; 20];
            block[2..4].copy_from_slice(&0x7c00u16.to_le_bytes());
            QTensor::from_ggml_blocks(QuantFormat::Q4_1, &block, &[1, 32], d)?;
            Ok(vec![])
        }),
        case("from_ggml_blocks: Q4_1 one byte short", Refused, |d| {
            QTensor::from_ggml_blocks(QuantFormat::Q4_1, &[0; 39], &[1, 64], d)?;
            Ok(vec![])
        }),
        case("qmatmul: Q4_1 GEMV, GEMM and input gradient", Accepted, |d| {
            // d = 1, m = −8: integer weights, so every device's sums are exact.
            let block: Vec<u8> =
                [0x00, 0x3C, 0x00, 0xC8].into_iter().chain((0..16u8).map(|j| j | ((15 - j) << 4))).collect();
            let w = QTensor::from_ggml_blocks(QuantFormat::Q4_1, &block.repeat(8), &[4, 64], d)?;
            Ok(vec![
                ops::qmatmul(&ints(&[3, 64], d)?, &w)?,
                ops::qmatmul(&ints(&[9, 64], d)?, &w)?,
                ops::qmatmul_input_grad(&ints(&[9, 4], d)?, &w)?,
            ])
        }),
        case("from_ggml_blocks: an NF4 format", Refused, |d| {
            QTensor::from_ggml_blocks(QuantFormat::Nf4, &[0; 32], &[1, 64], d)?;
            Ok(vec![])
        }),
        case("from_nf4: NaN absmax", Refused, |d| {
            let state = Nf4State { packed: vec![0; 32], block_size: 64, absmax: Nf4Absmax::F32(vec![NAN]) };
            QTensor::from_nf4(&state, &[1, 64], d)?;
            Ok(vec![])
        }),
        case("from_nf4: block size 128", Refused, |d| {
            let state = Nf4State { packed: vec![0; 64], block_size: 128, absmax: Nf4Absmax::F32(vec![1.0]) };
            QTensor::from_nf4(&state, &[1, 128], d)?;
            Ok(vec![])
        }),
        // GGUF tensors onto each device.
        case("gguf tensor: bf16", Accepted, |d| Ok(vec![gguf()?.tensor("dense.bf16", d)?])),
        case("gguf qtensor: q8_0", Accepted, |d| Ok(vec![gguf()?.qtensor("quant.q8_0", d)?.dequantize(DType::F32)?])),
        case("gguf tensor: a q4_0 weight", Refused, |d| Ok(vec![gguf()?.tensor("quant.q4_0", d)?])),
        case("gguf qtensor: an f16 tensor", Refused, |d| {
            Ok(vec![gguf()?.qtensor("dense.f16", d)?.dequantize(DType::F32)?])
        }),
        case("gguf qtensor: q4_1", Accepted, |d| Ok(vec![gguf()?.qtensor("quant.q4_1", d)?.dequantize(DType::F32)?])),
        case("gguf tensor: no such name", Refused, |d| Ok(vec![gguf()?.tensor("dense.nowhere", d)?])),
        // GGUF out, from tensors and models on each device.
        case("gguf writer: q8_0 from the device", Accepted, |d| {
            let mut w = kiln::io::GgufWriter::new();
            w.add_tensor("w", &full(&[2, 64], 0.5, d)?, kiln::io::GgmlType::Q8_0)?;
            Ok(vec![])
        }),
        case("gguf writer: q8_0 rows of 48", Refused, |d| {
            let mut w = kiln::io::GgufWriter::new();
            w.add_tensor("w", &z(&[2, 48], d)?, kiln::io::GgmlType::Q8_0)?;
            Ok(vec![])
        }),
        case("export_gguf: an adapter of another shape", Refused, |d| {
            let source =
                std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llama/tiny-q8_0.gguf"));
            let model = Llama::load(source, &LoadOptions::new(d))?;
            let mut adapter =
                kiln::model::LoraAdapter::init(kiln::model::LoraConfig::new(2, 4.0, &["q_proj"]), &model, 1)?;
            for layer in adapter.layers.values_mut() {
                layer.a = z(&[2, 32], d)?;
            }
            let out = std::env::temp_dir().join(format!("kiln-misuse-export-{}.gguf", std::process::id()));
            kiln::model::export_gguf(&model, Some(&adapter), source, &out)?;
            Ok(vec![])
        }),
        case("cross_entropy: target = vocab", Refused, |d| ce(&z(&[2, 5], d)?, &tgt(&[0, 5], d)?)),
        case("cross_entropy: target -1", Refused, |d| ce(&z(&[2, 5], d)?, &tgt(&[-1, 0], d)?)),
        case("cross_entropy: f32 targets", Refused, |d| ce(&z(&[2, 5], d)?, &z(&[2], d)?)),
        case("cross_entropy: u32 targets", Refused, |d| ce(&z(&[2, 5], d)?, &Tensor::from_slice(&[0u32, 1], &[2], d)?)),
        case("cross_entropy: targets longer than rows", Refused, |d| ce(&z(&[2, 5], d)?, &tgt(&[0, 1, 2], d)?)),
        case("cross_entropy: rank-3 logits", Refused, |d| ce(&z(&[1, 2, 5], d)?, &tgt(&[0], d)?)),
        case("cross_entropy: integer logits", Refused, |d| {
            ce(&Tensor::from_slice(&[0i32, 1], &[1, 2], d)?, &tgt(&[0], d)?)
        }),
        case("cross_entropy: NaN grad_scale", Refused, |d| {
            let o = ops::loss::CrossEntropyOptions::default().grad_scale(NAN);
            let out = ops::cross_entropy_with(&z(&[2, 5], d)?, &tgt(&[0, 1], d)?, o)?;
            Ok(vec![out.loss, out.dlogits])
        }),
        case("cross_entropy: every target ignored", Accepted, |d| ce(&ints(&[3, 5], d)?, &tgt(&[-100; 3], d)?)),
        case("cross_entropy: no rows", Accepted, |d| ce(&z(&[0, 5], d)?, &tgt(&[], d)?)),
        case("cross_entropy: no classes, rows ignored", Accepted, |d| ce(&z(&[2, 0], d)?, &tgt(&[-100, -100], d)?)),
        case("cross_entropy: no classes, a row counted", Refused, |d| ce(&z(&[2, 0], d)?, &tgt(&[0, -100], d)?)),
        case("linear_cross_entropy: chunk of 0 columns", Refused, |d| {
            lce(&z(&[2, 4], d)?, &z(&[5, 4], d)?, &tgt(&[0, 1], d)?, lce_opts().chunk_columns(0))
        }),
        case("linear_cross_entropy: head dtype differs", Refused, |d| {
            lce(&z(&[2, 4], d)?, &zt(&[5, 4], DType::BF16, d)?, &tgt(&[0, 1], d)?, lce_opts())
        }),
        case("linear_cross_entropy: d differs", Refused, |d| {
            lce(&z(&[2, 4], d)?, &z(&[5, 3], d)?, &tgt(&[0, 1], d)?, lce_opts())
        }),
        case("linear_cross_entropy: rank-1 h", Refused, |d| {
            lce(&z(&[4], d)?, &z(&[5, 4], d)?, &tgt(&[0], d)?, lce_opts())
        }),
        case("linear_cross_entropy: target past the vocabulary", Refused, |d| {
            lce(&z(&[2, 4], d)?, &z(&[5, 4], d)?, &tgt(&[0, 7], d)?, lce_opts())
        }),
        case("linear_cross_entropy: NaN grad_scale", Refused, |d| {
            lce(&z(&[2, 4], d)?, &z(&[5, 4], d)?, &tgt(&[0, 1], d)?, lce_opts().grad_scale(NAN))
        }),
        case("linear_cross_entropy: every target ignored", Accepted, |d| {
            lce(&ints(&[2, 4], d)?, &ints(&[5, 4], d)?, &tgt(&[-100, -100], d)?, lce_opts())
        }),
        case("linear_cross_entropy: d = 0", Accepted, |d| {
            lce(&z(&[2, 0], d)?, &z(&[5, 0], d)?, &tgt(&[3, -100], d)?, lce_opts())
        }),
        case("linear_cross_entropy: quantized head d differs", Refused, |d| {
            let w = QTensor::quantize(&ints(&[5, 32], d)?, QuantFormat::Q8_0)?;
            let out = ops::linear_cross_entropy(
                &z(&[2, 64], d)?,
                Head::Quantized(&w),
                &tgt(&[0, 1], d)?,
                Default::default(),
            )?;
            Ok(vec![out.loss, out.dh])
        }),
        case("linear_cross_entropy: head_grad of a quantized head", Refused, |d| {
            let w = QTensor::quantize(&ints(&[5, 32], d)?, QuantFormat::Q8_0)?;
            let o = lce_opts().head_grad();
            let out = ops::linear_cross_entropy(&z(&[2, 32], d)?, Head::Quantized(&w), &tgt(&[0, 1], d)?, o)?;
            Ok(vec![out.loss, out.dh])
        }),
        case("qmatmul: in = 0, GEMM rows", Accepted, |d| {
            let w = QTensor::quantize(&z(&[16, 0], d)?, QuantFormat::Q4_0)?;
            Ok(vec![ops::qmatmul(&z(&[9, 0], d)?, &w)?])
        }),
        case("qmatmul: in = 0, GEMM rows, Q4_1", Accepted, |d| {
            let w = QTensor::quantize(&z(&[16, 0], d)?, QuantFormat::Q4_1)?;
            Ok(vec![ops::qmatmul(&z(&[9, 0], d)?, &w)?])
        }),
        case("qmatmul: in = 0, GEMV rows", Accepted, |d| {
            let w = QTensor::quantize(&z(&[16, 0], d)?, QuantFormat::Nf4)?;
            Ok(vec![ops::qmatmul(&z(&[3, 0], d)?, &w)?])
        }),
        case("qmatmul: no tokens", Accepted, |d| {
            let w = QTensor::quantize(&ints(&[4, 32], d)?, QuantFormat::Q8_0)?;
            Ok(vec![ops::qmatmul(&z(&[0, 32], d)?, &w)?])
        }),
        case("qmatmul: in differs", Refused, |d| {
            let w = QTensor::quantize(&ints(&[4, 32], d)?, QuantFormat::Q8_0)?;
            Ok(vec![ops::qmatmul(&z(&[2, 64], d)?, &w)?])
        }),
        case("qmatmul: rank-0 x", Refused, |d| {
            let w = QTensor::quantize(&ints(&[4, 32], d)?, QuantFormat::Q8_0)?;
            Ok(vec![ops::qmatmul(&z(&[], d)?, &w)?])
        }),
        case("qmatmul: batched x", Accepted, |d| {
            let w = QTensor::quantize(&ints(&[4, 32], d)?, QuantFormat::Q8_0)?;
            Ok(vec![ops::qmatmul(&ints(&[2, 3, 32], d)?, &w)?])
        }),
        case("qmatmul: output no memory holds", Refused, |d| {
            let w = QTensor::quantize(&z(&[WIDE, 0], d)?, QuantFormat::Q8_0)?;
            Ok(vec![ops::qmatmul(&z(&[WIDE, 0], d)?, &w)?])
        }),
        case("qmatmul_input_grad: out differs", Refused, |d| {
            let w = QTensor::quantize(&ints(&[4, 32], d)?, QuantFormat::Q4_0)?;
            Ok(vec![ops::qmatmul_input_grad(&z(&[2, 5], d)?, &w)?])
        }),
        case("qmatmul_input_grad: out differs, Q4_1", Refused, |d| {
            let w = QTensor::quantize(&ints(&[4, 32], d)?, QuantFormat::Q4_1)?;
            Ok(vec![ops::qmatmul_input_grad(&z(&[2, 5], d)?, &w)?])
        }),
        case("qmatmul_input_grad: out = 0 gives zeros", Accepted, |d| {
            let w = QTensor::quantize(&z(&[0, 64], d)?, QuantFormat::Nf4DoubleQuant)?;
            Ok(vec![ops::qmatmul_input_grad(&z(&[3, 0], d)?, &w)?])
        }),
        case("qmatmul_input_grad: output no memory holds", Refused, |d| {
            let w = QTensor::quantize(&z(&[0, WIDE], d)?, QuantFormat::Q8_0)?;
            Ok(vec![ops::qmatmul_input_grad(&z(&[WIDE, 0], d)?, &w)?])
        }),
        // Embeddings.
        case("embedding: id out of range", Refused, |d| {
            Ok(vec![ops::embedding(&ints(&[3, 4], d)?, &ids(&[0, 3], &[2], d)?)?])
        }),
        case("embedding: i32 ids", Refused, |d| {
            Ok(vec![ops::embedding(&ints(&[3, 4], d)?, &Tensor::from_slice(&[0i32, 1], &[2], d)?)?])
        }),
        case("embedding: float ids", Refused, |d| Ok(vec![ops::embedding(&ints(&[3, 4], d)?, &ints(&[2], d)?)?])),
        case("embedding: rank-1 table", Refused, |d| Ok(vec![ops::embedding(&ints(&[12], d)?, &ids(&[0], &[1], d)?)?])),
        case("embedding: rank-0 ids", Accepted, |d| Ok(vec![ops::embedding(&ints(&[3, 4], d)?, &ids(&[2], &[], d)?)?])),
        case("embedding: no ids beside huge", Accepted, |d| {
            Ok(vec![ops::embedding(&ints(&[3, 4], d)?, &zt(&[HUGE, 0], DType::U32, d)?)?])
        }),
        case("embedding: empty table, an id", Refused, |d| {
            Ok(vec![ops::embedding(&z(&[0, 4], d)?, &ids(&[0], &[1], d)?)?])
        }),
        case("qembedding: id out of range", Refused, |d| {
            let w = QTensor::quantize(&ints(&[4, 32], d)?, QuantFormat::Q8_0)?;
            Ok(vec![ops::qembedding(&w, &ids(&[4], &[1], d)?, DType::F32)?])
        }),
        case("qembedding: u32 output", Refused, |d| {
            let w = QTensor::quantize(&ints(&[4, 32], d)?, QuantFormat::Q4_0)?;
            Ok(vec![ops::qembedding(&w, &ids(&[1], &[1], d)?, DType::U32)?])
        }),
        case("qembedding: every format, repeated ids", Accepted, |d| {
            let x = ints(&[3, 64], d)?;
            let ids = ids(&[2, 0, 2, 2], &[2, 2], d)?;
            QuantFormat::ALL.iter().map(|&f| ops::qembedding(&QTensor::quantize(&x, f)?, &ids, DType::BF16)).collect()
        }),
        case("qembedding: in = 0", Accepted, |d| {
            let w = QTensor::quantize(&z(&[4, 0], d)?, QuantFormat::Q8_0)?;
            Ok(vec![ops::qembedding(&w, &ids(&[3, 1], &[2], d)?, DType::F16)?])
        }),
        case("embedding_backward: dy's shape differs", Refused, |d| {
            Ok(vec![ops::embedding_backward(&z(&[3, 4], d)?, &ids(&[0, 1], &[2], d)?, 5)?])
        }),
        case("embedding_backward: id past vocab", Refused, |d| {
            Ok(vec![ops::embedding_backward(&z(&[2, 4], d)?, &ids(&[0, 5], &[2], d)?, 5)?])
        }),
        case("embedding_backward: gradient bytes past usize", Refused, |d| {
            Ok(vec![ops::embedding_backward(&z(&[1, 2], d)?, &ids(&[0], &[1], d)?, usize::MAX)?])
        }),
        case("embedding_backward: gradient no memory holds", Refused, |d| {
            Ok(vec![ops::embedding_backward(&z(&[0, WIDE], d)?, &zt(&[0], DType::U32, d)?, WIDE)?])
        }),
        case("embedding_backward: no positions give zeros", Accepted, |d| {
            Ok(vec![ops::embedding_backward(&z(&[0, 3], d)?, &zt(&[0], DType::U32, d)?, 4)?])
        }),
        case("embedding_backward: exact sums", Accepted, |d| {
            Ok(vec![ops::embedding_backward(&ints(&[2, 2, 3], d)?, &ids(&[1, 3, 1, 1], &[2, 2], d)?, 4)?])
        }),
        // LoRA.
        case("lora_forward: rank-3 dense W", Refused, |d| {
            let (w, a, b) = (z(&[1, 4, 6], d)?, z(&[2, 6], d)?, z(&[4, 2], d)?);
            let out = lora_forward(&z(&[3, 6], d)?, &dense(&w, &a, &b))?;
            Ok(vec![out.y, out.xa])
        }),
        case("lora_forward: rank-1 dense W", Refused, |d| {
            let (w, a, b) = (z(&[6], d)?, z(&[2, 6], d)?, z(&[1, 2], d)?);
            let out = lora_forward(&z(&[3, 6], d)?, &dense(&w, &a, &b))?;
            Ok(vec![out.y, out.xa])
        }),
        case("lora_forward: A and B ranks differ", Refused, |d| {
            let (w, a, b) = (z(&[4, 6], d)?, z(&[2, 6], d)?, z(&[4, 3], d)?);
            let out = lora_forward(&z(&[3, 6], d)?, &dense(&w, &a, &b))?;
            Ok(vec![out.y, out.xa])
        }),
        case("lora_forward: x's width differs", Refused, |d| {
            let (w, a, b) = (z(&[4, 6], d)?, z(&[2, 6], d)?, z(&[4, 2], d)?);
            let out = lora_forward(&z(&[3, 5], d)?, &dense(&w, &a, &b))?;
            Ok(vec![out.y, out.xa])
        }),
        case("lora_forward: out = 0 still gives x·Aᵀ", Accepted, |d| {
            let (w, a, b) = (z(&[0, 6], d)?, ints(&[2, 6], d)?, z(&[0, 2], d)?);
            let out = lora_forward(&ints(&[3, 6], d)?, &dense(&w, &a, &b))?;
            Ok(vec![out.y, out.xa])
        }),
        case("lora_forward: no tokens", Accepted, |d| {
            let (w, a, b) = (ints(&[4, 6], d)?, ints(&[2, 6], d)?, ints(&[4, 2], d)?);
            let out = lora_forward(&z(&[0, 6], d)?, &dense(&w, &a, &b))?;
            Ok(vec![out.y, out.xa])
        }),
        case("lora_forward: dropout p = 2", Refused, |d| {
            let (w, a, b) = (z(&[4, 6], d)?, z(&[2, 6], d)?, z(&[4, 2], d)?);
            let layer = LoraLinear { dropout: Some((2.0, 1)), ..dense(&w, &a, &b) };
            let out = lora_forward(&z(&[3, 6], d)?, &layer)?;
            Ok(vec![out.y, out.xa])
        }),
        case("lora_forward: bias of the wrong width", Refused, |d| {
            let (w, a, b, bias) = (z(&[4, 6], d)?, z(&[2, 6], d)?, z(&[4, 2], d)?, z(&[5], d)?);
            let layer = LoraLinear { bias: Some(&bias), ..dense(&w, &a, &b) };
            let out = lora_forward(&z(&[3, 6], d)?, &layer)?;
            Ok(vec![out.y, out.xa])
        }),
        case("lora_forward: rank-1 A over a quantized W", Refused, |d| {
            let w = QTensor::quantize(&ints(&[4, 32], d)?, QuantFormat::Q8_0)?;
            let (a, b) = (z(&[32], d)?, z(&[4, 1], d)?);
            let layer =
                LoraLinear { base: BaseWeight::Quantized(&w), bias: None, a: &a, b: &b, scale: 1.0, dropout: None };
            let out = lora_forward(&z(&[3, 32], d)?, &layer)?;
            Ok(vec![out.y, out.xa])
        }),
        case("lora_backward: xa of the wrong shape", Refused, |d| {
            let (w, a, b) = (z(&[4, 6], d)?, z(&[2, 6], d)?, z(&[4, 2], d)?);
            let g = lora_backward(&z(&[3, 4], d)?, &z(&[3, 6], d)?, &z(&[3, 3], d)?, &dense(&w, &a, &b))?;
            Ok(vec![g.dx, g.da, g.db])
        }),
        case("lora_backward: no tokens", Accepted, |d| {
            let (w, a, b) = (ints(&[4, 6], d)?, ints(&[2, 6], d)?, ints(&[4, 2], d)?);
            let g = lora_backward(&z(&[0, 4], d)?, &z(&[0, 6], d)?, &z(&[0, 2], d)?, &dense(&w, &a, &b))?;
            Ok(vec![g.dx, g.da, g.db])
        }),
        case("AdapterSet: shapes differ between adapters", Refused, |d| {
            let (a1, b1, a2, b2) = (z(&[2, 6], d)?, z(&[4, 2], d)?, z(&[2, 5], d)?, z(&[4, 2], d)?);
            AdapterSet::new(&[(&a1, &b1, 1.0), (&a2, &b2, 1.0)])?;
            Ok(vec![])
        }),
        case("AdapterSet: none", Either, |_| {
            AdapterSet::new(&[])?;
            Ok(vec![])
        }),
        case("lora_batched: index out of range", Refused, |d| {
            let (a, b) = (ints(&[2, 6], d)?, ints(&[4, 2], d)?);
            let set = AdapterSet::new(&[(&a, &b, 1.0)])?;
            Ok(vec![lora_batched(&ints(&[2, 6], d)?, &z(&[2, 4], d)?, &set, &[0, 1])?])
        }),
        case("lora_batched: negative index", Refused, |d| {
            let (a, b) = (ints(&[2, 6], d)?, ints(&[4, 2], d)?);
            let set = AdapterSet::new(&[(&a, &b, 1.0)])?;
            Ok(vec![lora_batched(&ints(&[2, 6], d)?, &z(&[2, 4], d)?, &set, &[0, -2])?])
        }),
        case("lora_batched: one index short", Refused, |d| {
            let (a, b) = (ints(&[2, 6], d)?, ints(&[4, 2], d)?);
            let set = AdapterSet::new(&[(&a, &b, 1.0)])?;
            Ok(vec![lora_batched(&ints(&[2, 6], d)?, &z(&[2, 4], d)?, &set, &[0])?])
        }),
        case("lora_batched: out = 0", Accepted, |d| {
            let (a, b) = (ints(&[2, 6], d)?, z(&[0, 2], d)?);
            let set = AdapterSet::new(&[(&a, &b, 1.0)])?;
            Ok(vec![lora_batched(&ints(&[2, 6], d)?, &z(&[2, 0], d)?, &set, &[0, -1])?])
        }),
        case("lora_batched: exact sums", Accepted, |d| {
            let (a, b) = (ints(&[2, 6], d)?, ints(&[4, 2], d)?);
            let set = AdapterSet::new(&[(&a, &b, 0.5)])?;
            Ok(vec![lora_batched(&ints(&[3, 6], d)?, &ints(&[3, 4], d)?, &set, &[0, -1, 0])?])
        }),
        case("merge: B's rank differs", Refused, |d| {
            Ok(vec![merge(&z(&[4, 6], d)?, &z(&[2, 6], d)?, &z(&[4, 3], d)?, 1.0)?])
        }),
        case("merge: rank-3 W", Refused, |d| {
            Ok(vec![merge(&z(&[1, 4, 6], d)?, &z(&[2, 6], d)?, &z(&[4, 2], d)?, 1.0)?])
        }),
        case("unmerge: rank 0 adapter", Accepted, |d| {
            Ok(vec![unmerge(&ints(&[4, 6], d)?, &z(&[0, 6], d)?, &z(&[4, 0], d)?, 1.0)?])
        }),
        // Attention.
        case("attention: rank 3", Refused, |d| {
            let q = z(&[1, 2, 8], d)?;
            attn(&q, &q, &q, &opts(false, None, None))
        }),
        case("attention: heads not a multiple of kv_heads", Refused, |d| {
            let (q, kv) = (z(&[1, 2, 3, 8], d)?, z(&[1, 2, 2, 8], d)?);
            attn(&q, &kv, &kv, &opts(false, None, None))
        }),
        case("attention: head dims differ", Refused, |d| {
            let (q, kv) = (z(&[1, 2, 2, 8], d)?, z(&[1, 2, 2, 4], d)?);
            attn(&q, &kv, &kv, &opts(false, None, None))
        }),
        case("attention: dtypes differ", Refused, |d| {
            let (q, kv) = (z(&[1, 2, 2, 8], d)?, zt(&[1, 2, 2, 8], DType::BF16, d)?);
            attn(&q, &kv, &kv, &opts(false, None, None))
        }),
        case("attention: head dim past the maximum", Refused, |d| {
            let q = z(&[1, 1, 1, 4096], d)?;
            attn(&q, &q, &q, &opts(false, None, None))
        }),
        case("attention: seq_lens of the wrong length", Refused, |d| {
            let q = z(&[2, 2, 1, 8], d)?;
            attn(&q, &q, &q, &opts(false, None, Some(vec![1])))
        }),
        case("attention: seq_lens past the tensor", Refused, |d| {
            let q = z(&[1, 2, 1, 8], d)?;
            attn(&q, &q, &q, &opts(false, None, Some(vec![3])))
        }),
        case("attention: NaN scale", Either, |d| {
            let q = ints(&[1, 2, 1, 8], d)?;
            attn(&q, &q, &q, &opts(false, Some(NAN), None))
        }),
        case("attention: no queries", Accepted, |d| {
            let (q, kv) = (z(&[1, 0, 2, 8], d)?, ints(&[1, 3, 2, 8], d)?);
            attn(&q, &kv, &kv, &opts(false, None, None))
        }),
        case("attention: no batch beside huge", Accepted, |d| {
            let q = z(&[0, HUGE, 2, 8], d)?;
            attn(&q, &q, &q, &opts(true, None, None))
        }),
        case("attention: lse no memory holds", Refused, |d| {
            let (q, kv) = (z(&[WIDE, WIDE, 1, 0], d)?, z(&[WIDE, 1, 1, 0], d)?);
            attn(&q, &kv, &kv, &opts(false, None, None))
        }),
        case("attention: zero seq_lens give zeros", Accepted, |d| {
            let q = ints(&[2, 3, 2, 8], d)?;
            attn(&q, &q, &q, &opts(true, None, Some(vec![0, 0])))
        }),
        case("attention_backward: bf16 lse", Refused, |d| {
            let q = full(&[1, 2, 1, 8], 0.5, d)?;
            let fwd = ops::attention::attention(&q, &q, &q, &opts(true, None, None))?;
            let bad = AttentionOutput { o: fwd.o.clone(), lse: fwd.lse.to_dtype(DType::BF16)? };
            let g = ops::attention::attention_backward(&q, &q, &q, &bad, &fwd.o, &opts(true, None, None))?;
            Ok(vec![g.dq, g.dk, g.dv])
        }),
        case("attention_backward: d_o of the wrong shape", Refused, |d| {
            let q = full(&[1, 2, 1, 8], 0.5, d)?;
            let fwd = ops::attention::attention(&q, &q, &q, &opts(true, None, None))?;
            let g =
                ops::attention::attention_backward(&q, &q, &q, &fwd, &z(&[1, 2, 1, 4], d)?, &opts(true, None, None))?;
            Ok(vec![g.dq, g.dk, g.dv])
        }),
        case("attention_backward: no queries", Accepted, |d| {
            let (q, kv) = (z(&[1, 0, 2, 8], d)?, ints(&[1, 3, 2, 8], d)?);
            let fwd = ops::attention::attention(&q, &kv, &kv, &opts(false, None, None))?;
            let g = ops::attention::attention_backward(&q, &kv, &kv, &fwd, &fwd.o, &opts(false, None, None))?;
            Ok(vec![g.dq, g.dk, g.dv])
        }),
        case("KvCache: capacity no memory holds", Refused, |d| {
            KvCache::new(WIDE, WIDE, 8, 128, DType::F32, d)?;
            Ok(vec![])
        }),
        case("KvCache: overflowing size", Refused, |d| {
            KvCache::new(HUGE, HUGE, 8, 128, DType::F32, d)?;
            Ok(vec![])
        }),
        case("KvCache: append past the capacity", Refused, |d| {
            let mut cache = KvCache::new(1, 2, 1, 8, DType::F32, d)?;
            cache.append(&z(&[1, 3, 1, 8], d)?, &z(&[1, 3, 1, 8], d)?, None)?;
            Ok(vec![cache.k().clone()])
        }),
        case("KvCache: counts past the rows given", Refused, |d| {
            let mut cache = KvCache::new(1, 8, 1, 8, DType::F32, d)?;
            cache.append(&z(&[1, 1, 1, 8], d)?, &z(&[1, 1, 1, 8], d)?, Some(&[2]))?;
            Ok(vec![cache.k().clone()])
        }),
        case("KvCache: truncate a missing sequence", Refused, |d| {
            let mut cache = KvCache::new(1, 2, 1, 8, DType::F32, d)?;
            cache.truncate(3, 0)?;
            Ok(vec![])
        }),
        case("KvCache: truncate past the length", Refused, |d| {
            let mut cache = KvCache::new(1, 2, 1, 8, DType::F32, d)?;
            cache.truncate(0, 1)?;
            Ok(vec![])
        }),
        case("attention_decode: heads not a multiple", Refused, |d| {
            let mut cache = KvCache::new(1, 4, 2, 8, DType::F32, d)?;
            cache.append(&ints(&[1, 2, 2, 8], d)?, &ints(&[1, 2, 2, 8], d)?, None)?;
            let out = attention_decode(&z(&[1, 1, 3, 8], d)?, &cache, &DecodeOptions::default())?;
            Ok(vec![out.o, out.lse])
        }),
        case("attention_decode: more queries than cached rows", Refused, |d| {
            let mut cache = KvCache::new(1, 4, 1, 8, DType::F32, d)?;
            cache.append(&ints(&[1, 1, 1, 8], d)?, &ints(&[1, 1, 1, 8], d)?, None)?;
            let out = attention_decode(&z(&[1, 2, 1, 8], d)?, &cache, &DecodeOptions::default())?;
            Ok(vec![out.o, out.lse])
        }),
        case("attention_decode: no queries", Accepted, |d| {
            let cache = KvCache::new(2, 4, 1, 8, DType::F32, d)?;
            let out = attention_decode(&z(&[2, 0, 1, 8], d)?, &cache, &DecodeOptions::default())?;
            Ok(vec![out.o, out.lse])
        }),
        // Optimizer.
        case("adamw_step: NaN lr", Refused, |d| {
            step_one(&mut z(&[4], d)?, &z(&[4], d)?, &AdamWHyper { lr: f64::NAN, ..Default::default() }, 1)
        }),
        case("adamw_step: beta2 = 1", Refused, |d| {
            step_one(&mut z(&[4], d)?, &z(&[4], d)?, &AdamWHyper { beta2: 1.0, ..Default::default() }, 1)
        }),
        case("adamw_step: step 0", Refused, |d| step_one(&mut z(&[4], d)?, &z(&[4], d)?, &AdamWHyper::default(), 0)),
        case("adamw_step: gradient shape differs", Refused, |d| {
            step_one(&mut z(&[4], d)?, &z(&[5], d)?, &AdamWHyper::default(), 1)
        }),
        case("adamw_step: bf16 master", Refused, |d| {
            step_one(&mut zt(&[4], DType::BF16, d)?, &z(&[4], d)?, &AdamWHyper::default(), 1)
        }),
        case("adamw_step: empty parameter", Accepted, |d| {
            step_one(&mut z(&[0, 3], d)?, &z(&[0, 3], d)?, &AdamWHyper::default(), 1)
        }),
        case("adamw_step: no slots", Either, |_| {
            adamw_step(&mut [], &AdamWHyper::default(), 1)?;
            Ok(vec![])
        }),
        case("fisher_accumulate: count 0", Refused, |d| {
            let mut f = z(&[4], d)?;
            fisher_accumulate(&mut f, &z(&[4], d)?, 0)?;
            Ok(vec![f])
        }),
        case("fisher_accumulate: shape differs", Refused, |d| {
            let mut f = z(&[4], d)?;
            fisher_accumulate(&mut f, &z(&[3], d)?, 1)?;
            Ok(vec![f])
        }),
        case("AdamW::new: a name with a line break", Refused, |d| {
            AdamW::new(&[("a\nb", &z(&[2], d)?)], AdamWHyper::default())?;
            Ok(vec![])
        }),
        case("AdamW::new: an empty name", Refused, |d| {
            AdamW::new(&[("", &z(&[2], d)?)], AdamWHyper::default())?;
            Ok(vec![])
        }),
        case("AdamW::new: NaN eps", Refused, |d| {
            AdamW::new(&[("w", &z(&[2], d)?)], AdamWHyper { eps: f64::NAN, ..Default::default() })?;
            Ok(vec![])
        }),
        case("AdamW::with_moments: moments of another shape", Refused, |d| {
            let (p, m) = (z(&[4], d)?, z(&[5], d)?);
            AdamW::with_moments(&[("w", &p)], &[(&m, &m)], 3, AdamWHyper::default())?;
            Ok(vec![])
        }),
        case("AdamW::with_moments: one pair short", Refused, |d| {
            AdamW::with_moments(&[("w", &z(&[4], d)?)], &[], 3, AdamWHyper::default())?;
            Ok(vec![])
        }),
        case("AdamW::with_moments: step count at its end", Refused, |d| {
            let p = z(&[4], d)?;
            AdamW::with_moments(&[("w", &p)], &[(&p, &p)], u64::MAX, AdamWHyper::default())?;
            Ok(vec![])
        }),
        case("AdamW::with_moments: negative second moment", Refused, |d| {
            let (p, v) = (z(&[4], d)?, full(&[4], -1.0, d)?);
            AdamW::with_moments(&[("w", &p)], &[(&p, &v)], 3, AdamWHyper::default())?;
            Ok(vec![])
        }),
        case("AdamW::with_moments: NaN second moment", Refused, |d| {
            let (p, v) = (z(&[4], d)?, full(&[4], NAN, d)?);
            AdamW::with_moments(&[("w", &p)], &[(&p, &v)], 3, AdamWHyper::default())?;
            Ok(vec![])
        }),
        case("AdamW::with_moments: bf16 moments resume", Accepted, |d| {
            let (p, m) = (ints(&[4], d)?, Tensor::full(&[4], 0.5, DType::BF16, d)?);
            let opt = AdamW::with_moments(&[("w", &p)], &[(&m, &m)], 3, AdamWHyper::default())?;
            Ok(vec![opt.params()[0].m.clone(), opt.params()[0].v.clone()])
        }),
        case("AdamW::step: gradients missing", Refused, |d| {
            let mut opt = AdamW::new(&[("w", &z(&[2], d)?)], AdamWHyper::default())?;
            opt.step(&[], &mut [])?;
            Ok(vec![])
        }),
        // Sampling.
        case("argmax: rank 1", Refused, |d| Ok(vec![ops::argmax(&ints(&[5], d)?)?])),
        case("argmax: rank 3", Refused, |d| Ok(vec![ops::argmax(&ints(&[1, 2, 5], d)?)?])),
        case("argmax: integer logits", Refused, |d| Ok(vec![ops::argmax(&zt(&[2, 5], DType::U32, d)?)?])),
        case("argmax: vocab 0", Refused, |d| Ok(vec![ops::argmax(&z(&[2, 0], d)?)?])),
        case("argmax: no rows beside huge vocab", Accepted, |d| Ok(vec![ops::argmax(&z(&[0, HUGE], d)?)?])),
        case("argmax: NaN rows", Accepted, |d| Ok(vec![ops::argmax(&full(&[3, 4], NAN, d)?)?])),
        case("sample: negative temperature", Refused, |d| {
            let p = ops::SamplingParams { temperature: -1.0, ..Default::default() };
            Ok(vec![ops::sample(&ints(&[2, 5], d)?, &p, 0)?])
        }),
        case("sample: NaN temperature", Refused, |d| {
            let p = ops::SamplingParams { temperature: NAN, ..Default::default() };
            Ok(vec![ops::sample(&ints(&[2, 5], d)?, &p, 0)?])
        }),
        case("sample: infinite temperature", Refused, |d| {
            let p = ops::SamplingParams { temperature: f32::INFINITY, ..Default::default() };
            Ok(vec![ops::sample(&ints(&[2, 5], d)?, &p, 0)?])
        }),
        case("sample: top_p 0", Refused, |d| {
            let p = ops::SamplingParams { top_p: 0.0, ..Default::default() };
            Ok(vec![ops::sample(&ints(&[2, 5], d)?, &p, 0)?])
        }),
        case("sample: top_p past 1", Refused, |d| {
            let p = ops::SamplingParams { top_p: 1.5, ..Default::default() };
            Ok(vec![ops::sample(&ints(&[2, 5], d)?, &p, 0)?])
        }),
        case("sample: top_p NaN", Refused, |d| {
            let p = ops::SamplingParams { top_p: NAN, ..Default::default() };
            Ok(vec![ops::sample(&ints(&[2, 5], d)?, &p, 0)?])
        }),
        case("sample: rank 1", Refused, |d| Ok(vec![ops::sample(&ints(&[5], d)?, &Default::default(), 0)?])),
        case("sample: integer logits", Refused, |d| {
            Ok(vec![ops::sample(&zt(&[2, 5], DType::I32, d)?, &Default::default(), 0)?])
        }),
        case("sample: vocab 0", Refused, |d| Ok(vec![ops::sample(&z(&[3, 0], d)?, &Default::default(), 0)?])),
        case("sample: top_k past the vocabulary", Accepted, |d| {
            let p = ops::SamplingParams { top_k: usize::MAX, top_p: 0.5, ..Default::default() };
            Ok(vec![ops::sample(&ints(&[3, 7], d)?, &p, u64::MAX)?])
        }),
        case("sample: NaN and infinite logits", Accepted, |d| {
            let x = Tensor::from_f32(&[NAN, f32::INFINITY, f32::NEG_INFINITY, 1.0], &[2, 2], DType::F32, d)?;
            let p = ops::SamplingParams { top_k: 1, top_p: 0.3, temperature: 1e-30, seed: 7 };
            Ok(vec![ops::sample(&x, &p, 0)?])
        }),
        case("train_step: empty batch", Refused, |d| train(&[], StepOptions::default(), d)),
        case("train_step: no counted target", Refused, |d| {
            train(&[seq(&[5, 6], &[-100, -100]), seq(&[], &[])], StepOptions::default(), d)
        }),
        case("train_step: id u32::MAX", Refused, |d| {
            train(&[seq(&[u32::MAX, 6], &[6, -100])], StepOptions::default(), d)
        }),
        case("train_step: target i32::MIN", Refused, |d| {
            train(&[seq(&[5, 6], &[i32::MIN, -100])], StepOptions::default(), d)
        }),
        case("train_step: more targets than ids", Refused, |d| {
            train(&[seq(&[5], &[6, -100])], StepOptions::default(), d)
        }),
        case("train_step: past the context", Refused, |d| {
            train(&[TrainSequence::causal(&[9; 1 << 16])], StepOptions::default(), d)
        }),
        case("train_step: infinite grad_scale", Refused, |d| {
            train(&[seq(&[5, 6], &[6, -100])], StepOptions::default().grad_scale(f32::INFINITY), d)
        }),
    ];
    // Every dtype through the ops that take any float dtype, with empty and huge-beside-empty
    // shapes.
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        all.push(case(&format!("matmul {dtype:?}: k = 0 gives zeros"), Accepted, move |d| {
            Ok(vec![ops::matmul(&zt(&[2, 0], dtype, d)?, &zt(&[0, 3], dtype, d)?)?])
        }));
        all.push(case(&format!("sum_rows {dtype:?}: empty rows beside huge"), Accepted, move |d| {
            Ok(vec![ops::sum_rows(&zt(&[HUGE, 0, 0], dtype, d)?)?])
        }));
        all.push(case(&format!("add_bias {dtype:?}: no rows"), Accepted, move |d| {
            Ok(vec![ops::add_bias(&zt(&[0, 4], dtype, d)?, &zt(&[4], dtype, d)?)?])
        }));
    }
    all
}

/// What one case gave: the error's kind, or every output's shape, dtype and bits.
#[derive(Debug, PartialEq)]
enum Outcome {
    Refused(String),
    Accepted(Vec<(Vec<usize>, DType, Vec<u32>)>),
}

fn kind(e: &Error) -> String {
    let text = format!("{e:?}");
    text.split(['(', ' ', '{']).next().unwrap_or("").to_string()
}

fn outcome(result: kiln::Result<Vec<Tensor>>) -> Outcome {
    match result {
        Err(e) => {
            assert!(!e.to_string().trim().is_empty(), "an error without a message: {e:?}");
            println!("  refused: {e}");
            Outcome::Refused(kind(&e))
        }
        Ok(tensors) => Outcome::Accepted(
            tensors
                .iter()
                .map(|t| {
                    if t.dtype() == DType::U32 {
                        return (
                            t.shape().to_vec(),
                            t.dtype(),
                            t.to_vec::<u32>().expect("an output copies to the host"),
                        );
                    }
                    let values = t.to_vec_f32().expect("an output copies to the host");
                    let bits =
                        values.iter().map(|v| if v.is_nan() { f32::NAN.to_bits() } else { v.to_bits() }).collect();
                    (t.shape().to_vec(), t.dtype(), bits)
                })
                .collect(),
        ),
    }
}

/// The walk, in the child process: every case on the CPU (checked against its expectation)
/// and on each device of `backend` (checked against the CPU). Panics listing every failure.
fn walk(backend: Backend) {
    let devices = common::backend_devices(backend);
    let mut failures = Vec::new();
    for case in cases() {
        for device in &devices {
            println!("CASE {device} {}", case.name);
            let run = |d: &Device| catch_unwind(AssertUnwindSafe(|| outcome((case.run)(d))));
            let on_cpu = match run(&Device::Cpu) {
                Ok(o) => o,
                Err(_) => {
                    failures.push(format!("{}: panicked on the CPU", case.name));
                    continue;
                }
            };
            match (case.expect, &on_cpu) {
                (Refused, Outcome::Accepted(_)) => failures.push(format!("{}: accepted, should be refused", case.name)),
                (Accepted, Outcome::Refused(k)) => {
                    failures.push(format!("{}: refused ({k}), should be accepted", case.name))
                }
                _ => {}
            }
            if device.is_cpu() {
                continue;
            }
            match run(device) {
                Ok(o) if o == on_cpu => {}
                Ok(o) => failures.push(format!("{}: {device} gives {o:?}, the CPU {on_cpu:?}", case.name)),
                Err(_) => failures.push(format!("{}: panicked on {device}", case.name)),
            }
        }
    }
    // Operands on two devices are refused.
    for device in devices.iter().filter(|d| !d.is_cpu()) {
        println!("CASE {device} mixed devices");
        let mixed = catch_unwind(AssertUnwindSafe(|| {
            let (here, cpu) = (z(&[2, 3], device).unwrap(), z(&[3, 2], &Device::Cpu).unwrap());
            let w = QTensor::quantize(&z(&[4, 32], &Device::Cpu).unwrap(), QuantFormat::Q8_0).unwrap();
            [
                ops::matmul(&here, &cpu).err(),
                ops::add(&here, &z(&[2, 3], &Device::Cpu).unwrap()).err(),
                ops::rms_norm(&here, &z(&[3], &Device::Cpu).unwrap(), 1e-5).err(),
                ops::swiglu(&here, &z(&[2, 3], &Device::Cpu).unwrap()).err(),
                ops::qmatmul(&z(&[2, 32], device).unwrap(), &w).err(),
                ops::embedding(&here, &Tensor::from_slice(&[0u32], &[1], &Device::Cpu).unwrap()).err(),
                ops::qembedding(&w, &Tensor::from_slice(&[0u32], &[1], device).unwrap(), DType::F32).err(),
                merge(
                    &z(&[4, 6], device).unwrap(),
                    &z(&[2, 6], &Device::Cpu).unwrap(),
                    &z(&[4, 2], device).unwrap(),
                    1.0,
                )
                .err(),
                ops::rope(
                    &z(&[1, 2, 1, 4], device).unwrap(),
                    &pos(&[1, 2], &Device::Cpu).unwrap(),
                    &RopeConfig::default(),
                )
                .err(),
            ]
            .map(|e| e.map(|e| kind(&e)))
        }));
        match mixed {
            Ok(kinds) if kinds.iter().all(|k| k.as_deref() == Some("DeviceMismatch")) => {}
            other => failures.push(format!("mixed devices on {device}: {other:?}")),
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    println!("WALKED {} cases on {} device(s)", cases().len(), devices.len());
}

/// Runs the walk for `backend` in a child process and reports how it ended.
fn walk_in_child(backend: Backend) {
    let exe = std::env::current_exe().unwrap();
    let output = std::process::Command::new(exe)
        .args(["--exact", "walk_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env("KILN_MISUSE_BACKEND", format!("{backend:?}"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    for line in stdout.lines().filter(|l| l.starts_with("SKIP") || l.starts_with("WALKED")) {
        println!("{line}");
    }
    if !output.status.success() {
        let last = stdout.lines().rev().find(|l| l.starts_with("CASE ")).unwrap_or("none");
        panic!("the walk on {backend:?} failed ({}; last case begun: {last})\n{stdout}\n{stderr}", output.status);
    }
    assert!(stdout.contains("WALKED"), "the child did not walk:\n{stdout}\n{stderr}");
}

#[test]
#[ignore = "the child half of the walks below; run by them"]
fn walk_child() {
    match std::env::var("KILN_MISUSE_BACKEND").as_deref() {
        Ok("Cpu") => walk(Backend::Cpu),
        Ok("Cuda") => walk(Backend::Cuda),
        Ok("Wgpu") => walk(Backend::Wgpu),
        other => panic!("KILN_MISUSE_BACKEND is {other:?}"),
    }
}

#[test]
fn every_public_op_refuses_misuse_cpu() {
    walk_in_child(Backend::Cpu);
}

#[test]
fn every_public_op_refuses_misuse_cuda() {
    walk_in_child(Backend::Cuda);
}

#[test]
fn every_public_op_refuses_misuse_wgpu() {
    walk_in_child(Backend::Wgpu);
}
