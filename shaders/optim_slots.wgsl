// Shared by optim_norm.wgsl and optim_step.wgsl: each generated shader serves a group of up
// to MAX_GROUP tensors, and workgroup g works on the tensor whose range of workgroups holds
// it.

const MAX_GROUP: u32 = 16u;

// One tensor of a group (SlotInfo in src/ops/optim/wgpu.rs): its elements, its first
// workgroup, and its stochastic-rounding key (the step only).
struct SlotInfo {
    len: u32,
    first_group: u32,
    key: u32,
    pad0: u32,
}
