//! What every CUDA launcher needs: dtype codes, checked conversions of sizes to the kernels'
//! integer types, and grid shapes.

use crate::{DType, Error, Result};
use cudarc::driver::LaunchConfig;

/// The dtype code the float kernels branch on (`kernels/common.cuh`: 0 f32, 1 f16, 2 bf16);
/// `Err(DType)` for an integer dtype, which no float kernel reads.
pub(crate) fn dtype_code(dtype: DType) -> Result<i32> {
    match dtype {
        DType::F32 => Ok(0),
        DType::F16 => Ok(1),
        DType::BF16 => Ok(2),
        DType::U32 | DType::I32 => Err(crate::tensor::not_float("a CUDA float kernel")),
    }
}

/// `v` as a kernel's 32-bit size; `Err(Unsupported)` naming `what` when it does not fit.
pub(crate) fn to_i32(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Unsupported(format!("{what} = {v} exceeds the kernels' 32-bit sizes")))
}

/// `v` blocks along grid dimension y or z (at most 65535); `Err(Unsupported)` past it.
pub(crate) fn grid(what: &str, v: usize) -> Result<u32> {
    if v > 65535 {
        return Err(Error::Unsupported(format!("{what} needs {v} blocks in a grid dimension limited to 65535")));
    }
    Ok(v as u32)
}

/// `v` blocks along grid dimension x (at most 2³¹ − 1); `Err(Unsupported)` past it.
pub(crate) fn grid_x(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).ok().filter(|&x| x < 1 << 31).ok_or_else(|| {
        Error::Unsupported(format!("{what} needs {v} blocks along a grid dimension limited to 2^31 - 1"))
    })
}

/// A grid-stride launch over `n` items: enough 256-thread blocks to fill any GPU, each
/// thread looping over the rest.
pub(crate) fn grid_stride(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}
