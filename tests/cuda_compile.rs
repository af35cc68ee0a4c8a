//! Every CUDA kernel compiles with NVRTC for real architectures (sm_80, sm_90), the ones the
//! GPUs run. Needs libnvrtc, not a GPU. Real archs make
//! ptxas check the inline PTX; the report shows registers, shared memory and spills.

#![cfg(feature = "cuda")]

use kiln::cuda::{KERNELS, compile, nvrtc_present, nvrtc_version};

/// ptxas' `-v` report condensed to one line per kernel: name, registers, shared memory, spills.
fn resource_lines(log: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    let mut spill = String::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            current = rest.split('\'').next().map(str::to_string);
        } else if line.contains("bytes stack frame") {
            spill = line.trim_start_matches(|c: char| !c.is_ascii_digit()).trim().to_string();
        } else if line.contains("Used") && line.contains("registers") {
            if let Some(name) = current.take() {
                let usage = line.split(':').nth(1).unwrap_or("").trim();
                out.push(format!("  {name}: {usage}; {spill}"));
            }
        }
    }
    out
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !nvrtc_present() {
        assert!(
            std::env::var("CI").is_err(),
            "CI=true but libnvrtc is not loadable: ci/test installs the NVRTC wheel and sets LD_LIBRARY_PATH"
        );
        println!("SKIP cuda compile check: libnvrtc not found (set LD_LIBRARY_PATH to its folder)");
        return;
    }
    let (major, minor) = nvrtc_version().expect("NVRTC version");
    println!("NVRTC {major}.{minor}");
    // Every (program, arch) pair on its own thread: NVRTC compiles separate programs
    // concurrently, and the reports print in a fixed order afterwards.
    let jobs: Vec<_> = KERNELS.iter().flat_map(|k| ["sm_80", "sm_90"].map(|arch| (k, arch))).collect();
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = jobs.iter().map(|&(kernel, arch)| scope.spawn(move || compile(kernel, arch))).collect();
        handles.into_iter().map(|h| h.join().expect("compile thread")).collect()
    });
    let mut failures = Vec::new();
    for (&(kernel, arch), result) in jobs.iter().zip(results) {
        match result {
            Ok(compiled) => {
                assert!(!compiled.image.is_empty(), "{} for {arch}: empty cubin", kernel.name);
                println!("kernels/{}.cu for {arch}: {} bytes of cubin", kernel.name, compiled.image.len());
                for line in resource_lines(&compiled.log) {
                    println!("{line}");
                }
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    assert!(failures.is_empty(), "kernels failed to compile:\n{}", failures.join("\n\n"));
}

#[test]
fn a_kernel_that_does_not_compile_is_an_error_carrying_nvrtcs_log() {
    if !nvrtc_present() {
        println!("SKIP: libnvrtc not found");
        return;
    }
    let broken = kiln::cuda::KernelSource {
        name: "broken",
        source: "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }",
    };
    match compile(&broken, "sm_80") {
        Err(kiln::Error::Compile { kernel, target, log }) => {
            assert_eq!((kernel.as_str(), target.as_str()), ("kernels/broken.cu", "sm_80"));
            assert!(log.contains("undefined_name"), "the log names the problem: {log}");
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
    // Inline PTX is checked by ptxas for a real arch: a bad instruction fails too.
    let bad_ptx = kiln::cuda::KernelSource {
        name: "bad_ptx",
        source: "extern \"C\" __global__ void k(float* x) { asm volatile(\"not.an.instruction;\"); }",
    };
    assert!(matches!(compile(&bad_ptx, "sm_90"), Err(kiln::Error::Compile { .. })));
}
