//! wgpu backend: every Vulkan, Metal and DX12 adapter, a device and queue per adapter opened
//! at first use, compute pipelines created at first use and cached per device, pooled
//! storage buffers; the helpers every launcher uses are in `launch.rs`.

pub(crate) mod launch;

use super::pool::{Pool, Pooled};
use super::{Device, DeviceInfo, DeviceKind};
use crate::kernels::KernelParams;
use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

pub(crate) type WgpuBuffer = Pooled<wgpu::Buffer>;

const BACKENDS: wgpu::Backends = wgpu::Backends::VULKAN.union(wgpu::Backends::METAL).union(wgpu::Backends::DX12);

struct AdapterSlot {
    adapter: wgpu::Adapter,
    info: wgpu::AdapterInfo,
    device: OnceLock<std::result::Result<Arc<WgpuDevice>, Error>>,
}

fn adapters() -> &'static [AdapterSlot] {
    static ADAPTERS: OnceLock<Vec<AdapterSlot>> = OnceLock::new();
    ADAPTERS.get_or_init(|| {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
        desc.backends = BACKENDS;
        let instance = wgpu::Instance::new(desc);
        pollster::block_on(instance.enumerate_adapters(BACKENDS))
            .into_iter()
            .map(|adapter| {
                let info = adapter.get_info();
                AdapterSlot { adapter, info, device: OnceLock::new() }
            })
            .collect()
    })
}

pub(crate) fn adapter_count() -> usize {
    adapters().len()
}

fn kind_of(t: wgpu::DeviceType) -> DeviceKind {
    match t {
        wgpu::DeviceType::DiscreteGpu => DeviceKind::DiscreteGpu,
        wgpu::DeviceType::IntegratedGpu => DeviceKind::IntegratedGpu,
        wgpu::DeviceType::Cpu => DeviceKind::SoftwareAdapter,
        _ => DeviceKind::OtherGpu,
    }
}

pub(crate) fn info(index: usize) -> Result<DeviceInfo> {
    let slot = adapters()
        .get(index)
        .ok_or_else(|| Error::NoDevice(format!("wgpu:{index}: {} adapter(s) present", adapter_count())))?;
    let features = slot.adapter.features();
    let limits = slot.adapter.limits();
    let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
    let details = vec![
        ("backend".to_string(), format!("{:?}", slot.info.backend)),
        ("driver".to_string(), format!("{} {}", slot.info.driver, slot.info.driver_info)),
        ("shader f16".to_string(), yes_no(features.contains(wgpu::Features::SHADER_F16))),
        (
            "subgroups".to_string(),
            if features.contains(wgpu::Features::SUBGROUP) {
                format!("yes (size {}..{})", slot.info.subgroup_min_size, slot.info.subgroup_max_size)
            } else {
                "no".to_string()
            },
        ),
        ("max storage binding".to_string(), format!("{} MiB", limits.max_storage_buffer_binding_size >> 20)),
        ("max workgroup storage".to_string(), format!("{} KiB", limits.max_compute_workgroup_storage_size >> 10)),
        ("max invocations per workgroup".to_string(), limits.max_compute_invocations_per_workgroup.to_string()),
    ];
    Ok(DeviceInfo {
        device: Device::Wgpu(index),
        kind: kind_of(slot.info.device_type),
        name: slot.info.name.clone(),
        memory_bytes: None,
        compute_capability: None,
        details,
    })
}

/// An opened adapter: device, queue, pipeline cache and buffer pool.
pub(crate) struct WgpuDevice {
    /// The adapter's index in [`adapters`].
    pub(crate) index: usize,
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    /// Whether the device was opened with SHADER_F16, so shaders may use `f16`.
    pub(crate) shader_f16: bool,
    max_binding: u64,
    pipelines: Mutex<HashMap<String, Arc<wgpu::ComputePipeline>>>,
    pool: Arc<Pool<wgpu::Buffer>>,
    params: Arc<Pool<wgpu::Buffer>>,
}

impl WgpuDevice {
    pub(crate) fn get(index: usize) -> Result<Arc<WgpuDevice>> {
        let slot = adapters()
            .get(index)
            .ok_or_else(|| Error::NoDevice(format!("wgpu:{index}: {} adapter(s) present", adapter_count())))?;
        slot.device.get_or_init(|| Self::open(index, &slot.adapter).map(Arc::new)).clone()
    }

    fn open(index: usize, adapter: &wgpu::Adapter) -> Result<WgpuDevice> {
        let wanted = wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP;
        let features = adapter.features() & wanted;
        let limits = adapter.limits();
        let desc = wgpu::DeviceDescriptor {
            label: Some("kiln"),
            required_features: features,
            required_limits: limits.clone(),
            ..Default::default()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&desc))
            .map_err(|e| Error::Wgpu(format!("opening the device: {e}")))?;
        // Errors are caught per call with error scopes; anything else is reported, not a panic.
        device.on_uncaptured_error(Arc::new(|e: wgpu::Error| eprintln!("kiln: wgpu error: {e}")));
        let max_binding = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        Ok(WgpuDevice {
            index,
            device,
            queue,
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            max_binding,
            pipelines: Mutex::new(HashMap::new()),
            pool: Pool::new(1 << 30),
            params: Pool::new(1 << 20),
        })
    }

    /// Runs `f` inside validation and out-of-memory error scopes and turns what they catch
    /// into an `Err`.
    fn scoped<T>(&self, what: &str, f: impl FnOnce() -> T) -> Result<T> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        let v = pollster::block_on(validation.pop());
        let o = pollster::block_on(oom.pop());
        if let Some(e) = o {
            return Err(Error::OutOfMemory(format!("{what}: {e}")));
        }
        if let Some(e) = v {
            return Err(Error::Wgpu(format!("{what}: {e}")));
        }
        Ok(out)
    }

    /// A storage buffer of at least `bytes` bytes, from the pool when one is idle.
    /// Filled with 0xFF when output poisoning is on.
    pub(crate) fn alloc(&self, bytes: usize) -> Result<WgpuBuffer> {
        let bucket = Pool::<wgpu::Buffer>::bucket(bytes);
        if bucket as u64 > self.max_binding {
            return Err(Error::OutOfMemory(format!(
                "a buffer of {bytes} bytes exceeds this adapter's largest storage binding ({} bytes)",
                self.max_binding
            )));
        }
        let buf = match self.pool.take(bucket) {
            Some(b) => b,
            None => {
                let create = || {
                    self.device.create_buffer(&wgpu::BufferDescriptor {
                        label: None,
                        size: bucket as u64,
                        usage: wgpu::BufferUsages::STORAGE
                            | wgpu::BufferUsages::COPY_SRC
                            | wgpu::BufferUsages::COPY_DST,
                        mapped_at_creation: false,
                    })
                };
                match self.scoped("allocating a buffer", create) {
                    Ok(b) => b,
                    Err(_) => {
                        self.pool.clear();
                        self.scoped(&format!("allocating {bucket} bytes"), create)?
                    }
                }
            }
        };
        if super::poison_outputs() {
            self.queue.write_buffer(&buf, 0, &vec![0xFF; bucket]);
        }
        Ok(Pooled::new(buf, bucket, self.pool.clone()))
    }

    /// The storage pool's `(live, peak)` bytes on loan (uniform buffers not counted).
    pub(crate) fn memory_usage(&self) -> (usize, usize) {
        self.pool.usage()
    }

    pub(crate) fn reset_peak_memory(&self) {
        self.pool.reset_peak()
    }

    /// Copies `bytes` to the start of `buf`, which holds at least that many (rounded up to
    /// whole words, as the pool sizes every buffer).
    pub(crate) fn write(&self, buf: &WgpuBuffer, bytes: &[u8]) -> Result<()> {
        let whole = bytes.len() / 4 * 4;
        if whole > 0 {
            self.queue.write_buffer(buf.get(), 0, &bytes[..whole]);
        }
        if whole < bytes.len() {
            // Copies move whole 4-byte words: pad the tail.
            let mut tail = [0u8; 4];
            tail[..bytes.len() - whole].copy_from_slice(&bytes[whole..]);
            self.queue.write_buffer(buf.get(), whole as u64, &tail);
        }
        Ok(())
    }

    /// Copies the first `bytes` bytes (rounded up to whole words) of `src` into `dst`.
    pub(crate) fn copy(&self, src: &WgpuBuffer, dst: &WgpuBuffer, bytes: usize) -> Result<()> {
        if bytes > 0 {
            self.scoped("device-to-device copy", || {
                let mut encoder = self.device.create_command_encoder(&Default::default());
                encoder.copy_buffer_to_buffer(src.get(), 0, dst.get(), 0, bytes.div_ceil(4) as u64 * 4);
                self.queue.submit([encoder.finish()]);
            })?;
        }
        Ok(())
    }

    /// Copies `bytes` bytes of `src` from `src_off` into `dst` at `dst_off`. WebGPU copies
    /// whole 4-byte words: offsets and size must be multiples of 4.
    pub(crate) fn copy_region(
        &self,
        src: &WgpuBuffer,
        src_off: usize,
        dst: &WgpuBuffer,
        dst_off: usize,
        bytes: usize,
    ) -> Result<()> {
        if !(src_off | dst_off | bytes).is_multiple_of(4) {
            return Err(Error::Unsupported(format!(
                "WebGPU copies whole 4-byte words; a copy of {bytes} bytes from offset {src_off} to {dst_off} is not"
            )));
        }
        self.scoped("device-to-device copy", || {
            let mut encoder = self.device.create_command_encoder(&Default::default());
            encoder.copy_buffer_to_buffer(src.get(), src_off as u64, dst.get(), dst_off as u64, bytes as u64);
            self.queue.submit([encoder.finish()]);
        })
    }

    pub(crate) fn download(&self, buf: &WgpuBuffer, bytes: usize) -> Result<Vec<u8>> {
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let padded = bytes.div_ceil(4) * 4;
        let staging = self.scoped("creating a staging buffer", || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("kiln readback"),
                size: padded as u64,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })?;
        let mut encoder = self.device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(buf.get(), 0, &staging, 0, padded as u64);
        self.queue.submit([encoder.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Wgpu(format!("waiting for a readback: {e}")))?;
        rx.recv()
            .map_err(|_| Error::Wgpu("readback callback dropped".into()))?
            .map_err(|e| Error::Wgpu(format!("mapping a readback buffer: {e}")))?;
        let data = staging.get_mapped_range(..).map_err(|e| Error::Wgpu(format!("reading a mapped buffer: {e}")))?
            [..bytes]
            .to_vec();
        staging.unmap();
        Ok(data)
    }

    pub(crate) fn synchronize(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| Error::Wgpu(format!("synchronize: {e}")))
    }

    /// The compute pipeline `key`, built from the WGSL `make_source` returns at first use.
    pub(crate) fn pipeline(
        &self,
        key: &str,
        make_source: impl FnOnce() -> String,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let mut pipelines = self.pipelines.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = pipelines.get(key) {
            return Ok(p.clone());
        }
        let source = make_source();
        let pipeline = self
            .scoped(&format!("building shader {key}"), || {
                let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(key),
                    source: wgpu::ShaderSource::Wgsl(source.as_str().into()),
                });
                self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(key),
                    layout: None,
                    module: &module,
                    entry_point: Some("main"),
                    compilation_options: Default::default(),
                    cache: None,
                })
            })
            .map_err(|e| match e {
                Error::Wgpu(log) => Error::Compile { kernel: key.to_string(), target: "wgsl".into(), log },
                other => other,
            })?;
        let pipeline = Arc::new(pipeline);
        pipelines.insert(key.to_string(), pipeline.clone());
        Ok(pipeline)
    }

    /// One dispatch: binds `buffers` at bindings 0.. and `params` (the shader's uniform
    /// block, its mirrored struct) after them, and runs `workgroups`. Submits at once; the
    /// queue keeps the order.
    pub(crate) fn dispatch<P: KernelParams>(
        &self,
        pipeline: &wgpu::ComputePipeline,
        buffers: &[&wgpu::Buffer],
        params: &P,
        workgroups: (u32, u32, u32),
    ) -> Result<()> {
        self.dispatch_params_at(pipeline, buffers, buffers.len(), params, workgroups)
    }

    /// [`Self::dispatch`] with the uniform block at binding `params_at`; the buffers take
    /// the bindings 0.. around it (for a shader that binds more after its uniform).
    pub(crate) fn dispatch_params_at<P: KernelParams>(
        &self,
        pipeline: &wgpu::ComputePipeline,
        buffers: &[&wgpu::Buffer],
        params_at: usize,
        params: &P,
        workgroups: (u32, u32, u32),
    ) -> Result<()> {
        let limit = self.device.limits().max_compute_workgroups_per_dimension;
        if workgroups.0 > limit || workgroups.1 > limit || workgroups.2 > limit {
            return Err(Error::Unsupported(format!(
                "dispatch of {workgroups:?} workgroups exceeds this adapter's {limit} per dimension"
            )));
        }
        if workgroups.0 == 0 || workgroups.1 == 0 || workgroups.2 == 0 {
            return Ok(());
        }
        let param_bytes: &[u8] = bytemuck::bytes_of(params);
        let bucket = Pool::<wgpu::Buffer>::bucket(param_bytes.len());
        let param_buf = match self.params.take(bucket) {
            Some(b) => b,
            None => self.scoped("allocating a uniform buffer", || {
                self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("kiln params"),
                    size: bucket as u64,
                    usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            })?,
        };
        let param_buf = Pooled::new(param_buf, bucket, self.params.clone());
        self.queue.write_buffer(param_buf.get(), 0, param_bytes);
        self.scoped("dispatching a kernel", || {
            let layout = pipeline.get_bind_group_layout(0);
            let mut entries: Vec<wgpu::BindGroupEntry> = buffers
                .iter()
                .enumerate()
                .map(|(i, b)| wgpu::BindGroupEntry {
                    binding: if i < params_at { i } else { i + 1 } as u32,
                    resource: b.as_entire_binding(),
                })
                .collect();
            entries.push(wgpu::BindGroupEntry {
                binding: params_at as u32,
                resource: param_buf.get().as_entire_binding(),
            });
            let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &layout,
                entries: &entries,
            });
            let mut encoder = self.device.create_command_encoder(&Default::default());
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, &bind_group, &[]);
                pass.dispatch_workgroups(workgroups.0, workgroups.1, workgroups.2);
            }
            self.queue.submit([encoder.finish()]);
        })
    }
}
