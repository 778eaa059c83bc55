//! Run-time compilation of the kernel sources to a cubin for the device's exact architecture
//! (SASS, so the driver never JIT-compiles PTX and a driver older than the NVRTC still loads
//! it within one CUDA major version).

use std::ffi::{c_char, CString};

use cudarc::nvrtc::{result, sys};

use super::CudaError;
use patch_kernels::cuda::translation_unit;

/// Whether libnvrtc can be loaded on this machine.
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by its known names.
    unsafe { sys::is_culib_present() }
}

/// Compiles `source` (one of `patch_kernels::cuda::SOURCES`, named `file`) for `arch`
/// (`sm_80`, `sm_90`, ...) and returns the cubin.
pub fn compile_cubin(file: &str, source: &str, arch: &str) -> Result<Vec<u8>, CudaError> {
    if !nvrtc_available() {
        return Err(CudaError::NoNvrtc);
    }
    let fail = |log: String| CudaError::Compile {
        file: file.to_string(),
        arch: arch.to_string(),
        log,
    };
    let src = CString::new(translation_unit(source)).map_err(|e| fail(e.to_string()))?;
    let name = CString::new(file).map_err(|e| fail(e.to_string()))?;
    let prog = result::create_program(&src, Some(&name)).map_err(|e| fail(format!("{e:?}")))?;
    // IEEE math (no --use_fast_math): the kernels are checked against the CPU ops at 2e-5.
    let options = [
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
    ];
    // SAFETY: `prog` is a live program until `destroy_program` below; every buffer handed to
    // NVRTC is sized by the matching size query.
    let outcome = unsafe {
        match result::compile_program(prog, &options) {
            Ok(()) => cubin_of(prog).map_err(|e| fail(format!("reading the cubin: {e:?}"))),
            Err(e) => {
                let log = result::get_program_log(prog)
                    .map(|l| {
                        let bytes: Vec<u8> =
                            l.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
                        String::from_utf8_lossy(&bytes).into_owned()
                    })
                    .unwrap_or_default();
                Err(fail(format!("{e:?}\n{log}")))
            }
        }
    };
    // SAFETY: `prog` was created above and is not used afterwards.
    unsafe {
        let _ = result::destroy_program(prog);
    }
    outcome
}

/// SAFETY: `prog` must be a successfully compiled, live program.
unsafe fn cubin_of(prog: sys::nvrtcProgram) -> Result<Vec<u8>, result::NvrtcError> {
    let mut size = 0usize;
    sys::nvrtcGetCUBINSize(prog, &mut size).result()?;
    let mut cubin = vec![0u8; size];
    sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char).result()?;
    Ok(cubin)
}
