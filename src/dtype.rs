//! Element types. Activations and weights are `f32`, `f16` or `bf16`; reductions accumulate in
//! f32. Token ids, targets and positions are integer tensors, `u32` or `i32`.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use std::fmt;

/// The element type of a [`crate::Tensor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// Token ids and positions.
    U32,
    /// Targets, where −100 marks a position the loss ignores.
    I32,
}

impl DType {
    /// Bytes one element takes.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::U32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Whether this is a floating-point type; the float ops refuse the others.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// Unit roundoff of the format (half the distance from 1.0 to the next value; 0 for the
    /// integer types, which hold their values exactly). Test tolerances are derived from it.
    pub fn unit_roundoff(self) -> f64 {
        match self {
            DType::U32 | DType::I32 => 0.0,
            DType::F32 => f32::EPSILON as f64 / 2.0,
            DType::F16 => 2f64.powi(-11),
            DType::BF16 => 2f64.powi(-8),
        }
    }

    /// Short lowercase name, as used in kernel names: `f32`, `f16`, `bf16`, `u32`, `i32`.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::U32 => "u32",
            DType::I32 => "i32",
        }
    }

    /// The floating-point types, which activations and weights use.
    pub const ALL: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    /// The integer types: ids, positions, targets.
    pub const INTEGERS: [DType; 2] = [DType::U32, DType::I32];
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A Rust type a tensor can hold: a float [`Element`], `u32` or `i32`.
pub trait Scalar: Copy + Send + Sync + bytemuck::Pod + 'static {
    const DTYPE: DType;
}

impl Scalar for u32 {
    const DTYPE: DType = DType::U32;
}

impl Scalar for i32 {
    const DTYPE: DType = DType::I32;
}

/// A floating-point element type, converted to and from f32 for arithmetic.
pub trait Element: Scalar {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// Converts a run of values (with SIMD where the type has it).
    fn slice_to_f32(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
    /// Rounds a run of f32 values to this type, to nearest even (with SIMD where the type
    /// has it).
    fn slice_from_f32(src: &[f32], dst: &mut [Self]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = Self::from_f32(s);
        }
    }
}

impl Scalar for f32 {
    const DTYPE: DType = DType::F32;
}

impl Element for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
    fn slice_to_f32(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn slice_from_f32(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
}

impl Scalar for f16 {
    const DTYPE: DType = DType::F16;
}

impl Element for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn slice_to_f32(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn slice_from_f32(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
}

impl Scalar for bf16 {
    const DTYPE: DType = DType::BF16;
}

impl Element for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn slice_to_f32(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn slice_from_f32(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
}
