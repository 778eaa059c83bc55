//! The CUDA backend (cargo feature `cuda`, on by default): the kernels of
//! `patch_kernels::cuda` compiled with NVRTC for the GPU found at run time, device tensors, and
//! an executor ([`CudaPlan`]) that runs a graph with every f32 op that has a kernel on the
//! device and the small integer shape arithmetic on the host.
//!
//! Everything is loaded dynamically (cudarc `dynamic-loading`): a build needs no CUDA, and a
//! machine without a driver gets [`CudaError::NoDriver`] from [`CudaDevice::open`], never a
//! panic. What ran on real hardware and what was only compiled is stated in `docs/CUDA.md`.

mod exec;
mod nvrtc;

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, DriverError};
use thiserror::Error;

pub use exec::{placement, Crossing, CudaPlan, DeviceHybrid, DeviceTensor, Placement, Value};
pub use nvrtc::{compile_cubin, nvrtc_available};

use patch_kernels::cuda::{KERNELS, MIN_COMPUTE_CAPABILITY, SOURCES};

/// Errors of the CUDA backend.
#[derive(Debug, Error)]
pub enum CudaError {
    #[error("no CUDA driver (libcuda.so) could be loaded: the cuda backend needs an NVIDIA GPU with its driver installed; run with --backend cpu")]
    NoDriver,
    #[error("the CUDA driver is installed but could not start ({0}): is a GPU attached and visible (CUDA_VISIBLE_DEVICES)?")]
    NoGpu(String),
    #[error("no CUDA device {ordinal}: the driver reports {count} device(s)")]
    NoDevice { ordinal: usize, count: usize },
    #[error("GPU `{name}` has compute capability {major}.{minor}; the hybrid kernels need sparse tensor cores (8.0, Ampere, or newer)")]
    TooOld {
        name: String,
        major: i32,
        minor: i32,
    },
    #[error("NVRTC (libnvrtc.so) could not be loaded: the cuda backend compiles its kernels at start-up; install the CUDA toolkit (or `pip install nvidia-cuda-nvrtc-cu12`) and add its lib directory to LD_LIBRARY_PATH")]
    NoNvrtc,
    #[error("compiling kernels/cuda/{file} for {arch} with NVRTC failed:\n{log}")]
    Compile {
        file: String,
        arch: String,
        log: String,
    },
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("node `{node}` ({op}) on the cuda backend: {msg}")]
    Node {
        node: String,
        op: String,
        msg: String,
    },
    #[error(transparent)]
    Runtime(#[from] crate::RuntimeError),
}

impl From<DriverError> for CudaError {
    fn from(e: DriverError) -> Self {
        CudaError::Driver(e.to_string())
    }
}

/// One GPU with the kernels loaded: a context, the stream every launch goes to, and the
/// kernel functions by name.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: HashMap<&'static str, CudaFunction>,
    name: String,
    compute_capability: (i32, i32),
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaDevice({}, sm_{}{})",
            self.name, self.compute_capability.0, self.compute_capability.1
        )
    }
}

/// Whether a CUDA driver library can be loaded on this machine (no device is touched).
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the driver library by its known names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

impl CudaDevice {
    /// Opens GPU `ordinal` and compiles every kernel for its architecture.
    pub fn open(ordinal: usize) -> Result<Arc<CudaDevice>, CudaError> {
        if !driver_available() {
            return Err(CudaError::NoDriver);
        }
        let count =
            CudaContext::device_count().map_err(|e| CudaError::NoGpu(e.to_string()))? as usize;
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal)?;
        let name = ctx.name()?;
        let (major, minor) = ctx.compute_capability()?;
        if (major, minor) < MIN_COMPUTE_CAPABILITY {
            return Err(CudaError::TooOld { name, major, minor });
        }
        // One stream and no cross-stream events: every launch and copy is ordered already.
        // SAFETY: this device never uses a second stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let arch = format!("sm_{major}{minor}");
        let mut functions = HashMap::new();
        for (file, source) in SOURCES {
            let cubin = compile_cubin(file, source, &arch)?;
            let module = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin))?;
            for &(_, kernel) in KERNELS.iter().filter(|(f, _)| *f == file) {
                functions.insert(kernel, module.load_function(kernel)?);
            }
        }
        Ok(Arc::new(CudaDevice {
            ctx,
            stream,
            functions,
            name,
            compute_capability: (major, minor),
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The kernel called `name` (one of `patch_kernels::cuda::KERNELS`).
    pub fn function(&self, name: &str) -> Result<&CudaFunction, CudaError> {
        self.functions
            .get(name)
            .ok_or_else(|| CudaError::Driver(format!("kernel `{name}` is not loaded")))
    }

    /// Waits for everything queued so far.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize()?;
        Ok(())
    }
}
