//! The registry of kernel sources: every CUDA program under `kernels/`, each with the
//! headers it needs prepended in order, and every WGSL shader under `shaders/`. The device
//! layer compiles them (NVRTC, wgpu) and the ops launch them; neither lists files itself.

/// A CUDA C++ program from `kernels/`, embedded in the crate: what NVRTC compiles as one
/// module.
#[cfg(feature = "cuda")]
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// File stem of the program, e.g. `matmul`; also the module's cache key.
    pub name: &'static str,
    /// The headers and the program, concatenated.
    pub source: &'static str,
}

/// The CUDA programs, one per kernel family (attention in three: forward, backward, decoding).
#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use super::KernelSource;

    /// Prepends the shared headers to a program, in the order they depend on each other.
    macro_rules! program {
        ($name:literal: $($header:literal),* $(,)?) => {
            KernelSource {
                name: $name,
                source: concat!(
                    $(include_str!(concat!("../kernels/", $header)),)*
                    include_str!(concat!("../kernels/", $name, ".cu"))
                ),
            }
        };
    }

    pub(crate) const MATMUL: KernelSource = program!("matmul": "common.cuh", "gemm.cuh");
    pub(crate) const ELEMENTWISE: KernelSource = program!("elementwise": "common.cuh");
    pub(crate) const QUANT: KernelSource = program!("quant": "common.cuh", "gemm.cuh", "quant.cuh");
    pub(crate) const OPTIM: KernelSource = program!("optim": "common.cuh");
    pub(crate) const LORA: KernelSource = program!("lora": "common.cuh", "gemm.cuh", "quant.cuh");
    pub(crate) const ATTENTION_FWD: KernelSource = program!("attention_fwd": "common.cuh", "gemm.cuh", "attention.cuh");
    pub(crate) const ATTENTION_BWD: KernelSource = program!("attention_bwd": "common.cuh", "gemm.cuh", "attention.cuh");
    pub(crate) const ATTENTION_DECODE: KernelSource = program!("attention_decode": "common.cuh");

    /// Every CUDA program of the crate; the compile check builds each for each real arch.
    pub const ALL: &[KernelSource] =
        &[MATMUL, ELEMENTWISE, QUANT, OPTIM, LORA, ATTENTION_FWD, ATTENTION_BWD, ATTENTION_DECODE];
}

/// The WGSL shaders. Most are completed by their launcher, which prepends the bindings and
/// loaders for the operands' dtypes (see `device::wgpu::launch`).
#[cfg(feature = "wgpu")]
pub(crate) mod wgsl {
    macro_rules! shader {
        ($file:literal) => {
            include_str!(concat!("../shaders/", $file, ".wgsl"))
        };
    }

    pub(crate) const MATMUL: &str = shader!("matmul");
    pub(crate) const ELEMENTWISE_MAP: &str = shader!("elementwise_map");
    pub(crate) const ELEMENTWISE_SUM_ROWS: &str = shader!("elementwise_sum_rows");
    pub(crate) const QUANT_DECODE: &str = shader!("quant_decode");
    pub(crate) const QUANT_GEMV: &str = shader!("quant_gemv");
    pub(crate) const OPTIM_NORM: &str = shader!("optim_norm");
    pub(crate) const OPTIM_REDUCE: &str = shader!("optim_reduce");
    pub(crate) const OPTIM_STEP: &str = shader!("optim_step");
    pub(crate) const LORA_FUSED: &str = shader!("lora_fused");
    pub(crate) const LORA_SHRINK: &str = shader!("lora_shrink");
    pub(crate) const LORA_EXPAND: &str = shader!("lora_expand");
    pub(crate) const ATTENTION_COMMON: &str = shader!("attention_common");
    pub(crate) const ATTENTION_FWD: &str = shader!("attention_fwd");
    pub(crate) const ATTENTION_BWD_COMMON: &str = shader!("attention_bwd_common");
    pub(crate) const ATTENTION_BWD_DQ: &str = shader!("attention_bwd_dq");
    pub(crate) const ATTENTION_BWD_DKV: &str = shader!("attention_bwd_dkv");
    pub(crate) const ATTENTION_DECODE_SPLIT: &str = shader!("attention_decode_split");
    pub(crate) const ATTENTION_DECODE_MERGE: &str = shader!("attention_decode_merge");
}
