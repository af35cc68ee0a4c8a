//! The host device: facts about it. Its kernels live beside each op in `src/ops/`.

use super::{Device, DeviceInfo, DeviceKind};

pub(crate) fn info() -> DeviceInfo {
    let threads = rayon::current_num_threads();
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut details = vec![("threads".to_string(), threads.to_string())];
    #[cfg(target_arch = "x86_64")]
    {
        let simd = if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            "avx2+fma"
        } else {
            "sse2"
        };
        details.push(("simd".to_string(), simd.to_string()));
    }
    DeviceInfo {
        device: Device::Cpu,
        kind: DeviceKind::Cpu,
        name: format!("{} host ({threads} threads)", std::env::consts::ARCH),
        memory_bytes: None,
        compute_capability: None,
        details,
    }
}
