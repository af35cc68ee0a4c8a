// Shared by every kiln kernel (prepended to each source before NVRTC compiles it).
//
// Half-precision values travel as raw 16-bit patterns (`u16`) and are converted with
// inline PTX, so the kernels need no CUDA headers at run time. Out-dtype codes shared with
// the Rust launchers: 0 = f32, 1 = f16, 2 = bf16.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float bf16_to_f32(u16 h) {
    return __uint_as_float(((u32)h) << 16);
}

__device__ __forceinline__ u16 f32_to_bf16(float f) {
#if __CUDA_ARCH__ >= 800
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    u32 b = __float_as_uint(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (u16)((b >> 16) | 0x40u);  // quiet NaN
    return (u16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);                  // nearest even
#endif
}

// Element types: the stored type and its conversions to and from f32.
struct F32 {
    typedef float storage;
    static __device__ __forceinline__ float load(float x) { return x; }
    static __device__ __forceinline__ float store(float x) { return x; }
};
struct F16 {
    typedef u16 storage;
    static __device__ __forceinline__ float load(u16 x) { return f16_to_f32(x); }
    static __device__ __forceinline__ u16 store(float x) { return f32_to_f16(x); }
};
struct BF16 {
    typedef u16 storage;
    static __device__ __forceinline__ float load(u16 x) { return bf16_to_f32(x); }
    static __device__ __forceinline__ u16 store(float x) { return f32_to_bf16(x); }
};

// Writes v to element idx of an output whose dtype is only known at run time.
__device__ __forceinline__ void store_out(void* out, u64 idx, float v, int out_kind) {
    if (out_kind == 0) {
        ((float*)out)[idx] = v;
    } else if (out_kind == 1) {
        ((u16*)out)[idx] = f32_to_f16(v);
    } else {
        ((u16*)out)[idx] = f32_to_bf16(v);
    }
}
