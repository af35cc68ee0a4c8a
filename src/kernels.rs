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
    pub(crate) const EMBEDDING: KernelSource = program!("embedding": "common.cuh", "gemm.cuh", "quant.cuh");
    pub(crate) const QUANT: KernelSource = program!("quant": "common.cuh", "gemm.cuh", "quant.cuh");
    pub(crate) const OPTIM: KernelSource = program!("optim": "common.cuh");
    pub(crate) const LORA: KernelSource = program!("lora": "common.cuh", "gemm.cuh", "quant.cuh");
    pub(crate) const ATTENTION_FWD: KernelSource = program!("attention_fwd": "common.cuh", "gemm.cuh", "attention.cuh");
    pub(crate) const ATTENTION_BWD: KernelSource = program!("attention_bwd": "common.cuh", "gemm.cuh", "attention.cuh");
    pub(crate) const ATTENTION_DECODE: KernelSource = program!("attention_decode": "common.cuh");
    pub(crate) const SAMPLING: KernelSource = program!("sampling": "common.cuh");
    pub(crate) const LOSS: KernelSource = program!("loss": "common.cuh");
    pub(crate) const ROPE: KernelSource = program!("rope": "common.cuh");
    pub(crate) const NORM: KernelSource = program!("norm": "common.cuh");
    pub(crate) const ACTIVATION: KernelSource = program!("activation": "common.cuh");

    /// Every CUDA program of the crate; the compile check builds each for each real arch.
    pub const ALL: &[KernelSource] = &[
        MATMUL,
        ELEMENTWISE,
        QUANT,
        OPTIM,
        LORA,
        ATTENTION_FWD,
        ATTENTION_BWD,
        ATTENTION_DECODE,
        SAMPLING,
        LOSS,
        EMBEDDING,
        ROPE,
        NORM,
        ACTIVATION,
    ];
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
    pub(crate) const EMBEDDING_COMMON: &str = shader!("embedding_common");
    pub(crate) const EMBEDDING_GATHER: &str = shader!("embedding_gather");
    pub(crate) const EMBEDDING_QGATHER: &str = shader!("embedding_qgather");
    pub(crate) const EMBEDDING_BACKWARD: &str = shader!("embedding_backward");
    pub(crate) const QUANT_DECODE: &str = shader!("quant_decode");
    pub(crate) const QUANT_GEMV: &str = shader!("quant_gemv");
    pub(crate) const OPTIM_SLOTS: &str = shader!("optim_slots");
    pub(crate) const OPTIM_NORM: &str = shader!("optim_norm");
    pub(crate) const OPTIM_REDUCE: &str = shader!("optim_reduce");
    pub(crate) const OPTIM_STEP: &str = shader!("optim_step");
    pub(crate) const OPTIM_FISHER: &str = shader!("optim_fisher");
    pub(crate) const LORA_FUSED: &str = shader!("lora_fused");
    pub(crate) const LORA_ADAPTERS: &str = shader!("lora_adapters");
    pub(crate) const LORA_SHRINK: &str = shader!("lora_shrink");
    pub(crate) const LORA_EXPAND: &str = shader!("lora_expand");
    pub(crate) const ATTENTION_COMMON: &str = shader!("attention_common");
    pub(crate) const ATTENTION_FWD: &str = shader!("attention_fwd");
    pub(crate) const ATTENTION_BWD_COMMON: &str = shader!("attention_bwd_common");
    pub(crate) const ATTENTION_BWD_DQ: &str = shader!("attention_bwd_dq");
    pub(crate) const ATTENTION_BWD_DKV: &str = shader!("attention_bwd_dkv");
    pub(crate) const ATTENTION_DECODE_SPLIT: &str = shader!("attention_decode_split");
    pub(crate) const ATTENTION_DECODE_MERGE: &str = shader!("attention_decode_merge");
    pub(crate) const SAMPLING: &str = shader!("sampling");
    pub(crate) const LOSS_LSE: &str = shader!("loss_lse");
    pub(crate) const LOSS_GRAD: &str = shader!("loss_grad");
    pub(crate) const LOSS_FINISH: &str = shader!("loss_finish");
    pub(crate) const ROPE: &str = shader!("rope");
    pub(crate) const NORM_FORWARD: &str = shader!("norm_forward");
    pub(crate) const NORM_BACKWARD_DX: &str = shader!("norm_backward_dx");
    pub(crate) const NORM_DW_PARTIAL: &str = shader!("norm_dw_partial");
    pub(crate) const NORM_DW_REDUCE: &str = shader!("norm_dw_reduce");
    pub(crate) const ACTIVATION_MAP: &str = shader!("activation_map");
}

/// A `#[repr(C)]` struct of kernel parameters. Its twin is declared field for field, in the
/// same order and with the matching types, in the kernel source that reads it (a `.cu`
/// program or a `.wgsl` shader); [`kernel_params!`] declares the Rust side and each
/// launcher's tests check the twin with [`mirror::assert_mirrored`].
#[allow(dead_code)] // the names are read by the mirror tests and the WGSL generator
pub(crate) trait KernelParams: bytemuck::Pod {
    /// The struct's name, the same in Rust and in the kernel source.
    const NAME: &'static str;
    /// `(field, Rust type)` in declaration order.
    const FIELDS: &'static [(&'static str, &'static str)];
}

/// Declares a kernel parameter struct: `#[repr(C)]`, `Pod` (so no hidden padding: padding
/// is spelled out as fields, as the kernel source spells it) and [`KernelParams`].
macro_rules! kernel_params {
    ($(#[$attr:meta])* $vis:vis struct $name:ident { $($(#[$fattr:meta])* $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$attr])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
        $vis struct $name {
            $($(#[$fattr])* pub $field: $ty),*
        }

        impl $crate::kernels::KernelParams for $name {
            const NAME: &'static str = stringify!($name);
            const FIELDS: &'static [(&'static str, &'static str)] = &[$((stringify!($field), stringify!($ty))),*];
        }

        // SAFETY: a `#[repr(C)]` `Pod` struct goes to a kernel by value, byte for byte.
        #[cfg(feature = "cuda")]
        unsafe impl cudarc::driver::DeviceRepr for $name {}
    };
}
pub(crate) use kernel_params;

/// WGSL text of a struct made of other parameter structs (a shader's `Params` when
/// several fragments share one uniform: `struct Params { mm: MatmulParams, q: QuantParams }`).
/// Generated from the Rust struct, so it mirrors it by construction.
#[cfg(feature = "wgpu")]
pub(crate) fn wgsl_struct<P: KernelParams>(name: &str) -> String {
    let fields: String = P::FIELDS.iter().map(|(f, ty)| format!("    {f}: {},\n", wgsl_type(ty))).collect();
    format!("struct {name} {{\n{fields}}}\n")
}

/// How WGSL spells a Rust field type: scalars by name, `[T; N]` as `array<T, N>`, other
/// parameter structs by their name.
#[cfg(any(feature = "wgpu", all(test, feature = "cuda")))]
pub(crate) fn wgsl_type(rust: &str) -> String {
    match rust.strip_prefix('[').and_then(|t| t.strip_suffix(']')).and_then(|t| t.split_once(';')) {
        Some((elem, n)) => format!("array<{}, {}>", wgsl_type(elem.trim()), n.trim()),
        None => rust.to_string(),
    }
}

/// Checks a parameter struct against its twin in a kernel source.
#[cfg(all(test, any(feature = "cuda", feature = "wgpu")))]
pub(crate) mod mirror {
    use super::{KernelParams, wgsl_type};

    /// The language of a kernel source.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Lang {
        Cuda,
        Wgsl,
    }

    /// How CUDA C++ spells a Rust field type (`common.cuh` defines u32 and u64).
    fn cuda_type(rust: &str) -> String {
        match rust {
            "i32" => "int".to_string(),
            "f32" => "float".to_string(),
            other => other.to_string(),
        }
    }

    /// The `(field, type)` list of `struct name` in a source, comments dropped: CUDA's
    /// `type a, b;` declarations or WGSL's `a: type,` members.
    pub(crate) fn declared_fields(source: &str, name: &str, lang: Lang) -> Option<Vec<(String, String)>> {
        let text: String = source.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
        let start = text.match_indices(&format!("struct {name} ")).map(|(i, _)| i).find(|&i| {
            // A whole-word match: not the tail of a longer name.
            i == 0 || !text[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_')
        })?;
        let body_start = start + text[start..].find('{')? + 1;
        let body = &text[body_start..body_start + text[body_start..].find('}')?];
        let mut fields = Vec::new();
        match lang {
            Lang::Cuda => {
                for decl in body.split(';').map(str::trim).filter(|d| !d.is_empty()) {
                    let (ty, names) = decl.split_once(char::is_whitespace)?;
                    for n in names.split(',') {
                        fields.push((n.trim().to_string(), ty.trim().to_string()));
                    }
                }
            }
            Lang::Wgsl => {
                // Split on the commas outside of `<...>`.
                let (mut depth, mut item) = (0, String::new());
                for c in body.chars().chain([',']) {
                    match c {
                        '<' => depth += 1,
                        '>' => depth -= 1,
                        ',' if depth == 0 => {
                            if let Some((n, ty)) = item.split_once(':') {
                                let ty: String = ty.split_whitespace().collect();
                                fields.push((n.trim().to_string(), ty.replace(',', ", ")));
                            }
                            item.clear();
                            continue;
                        }
                        _ => {}
                    }
                    item.push(c);
                }
            }
        }
        Some(fields)
    }

    /// Panics unless `source` declares `struct P::NAME` with P's fields, in order, with the
    /// matching types. For WGSL it also checks that the struct's size is a multiple of 16
    /// bytes, which makes its uniform-buffer layout (struct members aligned to 16) equal to
    /// Rust's `#[repr(C)]` layout wherever it is placed.
    pub(crate) fn assert_mirrored<P: KernelParams>(source: &str, lang: Lang) {
        let declared = declared_fields(source, P::NAME, lang)
            .unwrap_or_else(|| panic!("no `struct {}` in the {lang:?} source", P::NAME));
        let expected: Vec<(String, String)> = P::FIELDS
            .iter()
            .map(|(n, ty)| {
                let ty = match lang {
                    Lang::Cuda => cuda_type(ty),
                    Lang::Wgsl => wgsl_type(ty),
                };
                (n.to_string(), ty)
            })
            .collect();
        assert_eq!(declared, expected, "struct {}: the {lang:?} declaration differs from the Rust one", P::NAME);
        if lang == Lang::Wgsl {
            let size = std::mem::size_of::<P>();
            assert!(
                size.is_multiple_of(16),
                "struct {}: {size} bytes, not a multiple of 16 (add padding fields)",
                P::NAME
            );
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        crate::kernels::kernel_params! {
            struct Probe {
                len: u64,
                scale: f32,
                count: i32,
            }
        }

        #[test]
        fn a_declaration_that_differs_fails_and_an_equal_one_passes() {
            let cuda = "// header\nstruct Probe {\n    u64 len;  // elements\n    float scale;\n    int count;\n};";
            assert_mirrored::<Probe>(cuda, Lang::Cuda);
            for wrong in [
                "struct Probe { u64 len; int scale; int count; };",
                "struct Probe { u64 len; float count; int scale; };",
                "struct Probe { u64 len; float scale; };",
                "struct LongProbe { u64 len; float scale; int count; };",
            ] {
                let caught = std::panic::catch_unwind(|| assert_mirrored::<Probe>(wrong, Lang::Cuda));
                assert!(caught.is_err(), "{wrong} was accepted");
            }
            let wgsl = "struct Probe {\n    len: u64,\n    scale: f32,\n    count: i32,\n}";
            assert_eq!(
                declared_fields(wgsl, "Probe", Lang::Wgsl).unwrap(),
                [("len", "u64"), ("scale", "f32"), ("count", "i32")].map(|(a, b)| (a.to_string(), b.to_string()))
            );
            let nested = "struct P { info: array<Slot, 16>, n: u32 }";
            assert_eq!(declared_fields(nested, "P", Lang::Wgsl).unwrap()[0].1, "array<Slot, 16>");
            assert_eq!(wgsl_type("[Slot; 16]"), "array<Slot, 16>");
        }
    }
}
