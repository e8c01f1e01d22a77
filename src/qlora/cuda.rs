//! Launches of this crate's CUDA kernels (`kernels/qlora.cu`, compiled to
//! PTX by `build.rs` under the `cuda` feature): the NF4 dequantization of
//! [`super::nf4_device`] and the loss of [`super::loss`].

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::{CudaStorage, DType, Layout, Storage};

use super::nf4::NF4_CODE;
use super::nf4_device::DeviceScales;

/// The kernels' PTX.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/qlora.ptx"));
/// The module name the kernels are cached under on each device.
const MODULE: &str = "qlora-scale";

/// The NF4 code values, passed to the kernels by value (`struct Nf4Table`).
#[repr(C)]
#[derive(Clone, Copy)]
struct Nf4Table([f32; 16]);

// SAFETY: plain `#[repr(C)]` data, the layout of the kernels' `Nf4Table`.
unsafe impl DeviceRepr for Nf4Table {}

/// Threads per block of the element-wise kernels.
const THREADS: u32 = 256;
/// Threads per block (one block per row) of the loss kernels.
const NLL_THREADS: u32 = 256;

/// Kernel `name` of the module (loaded once per device), to launch on the
/// device's stream.
pub(crate) fn kernel_fn(
    dev: &candle_core::CudaDevice,
    name: &str,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaFunction> {
    Ok(dev
        .get_or_load_custom_func(name, MODULE, PTX)?
        .into_cuda_function())
}

/// Kernel `$name` of the module, loaded once per device.
macro_rules! kernel {
    ($dev:expr, $name:expr) => {
        $dev.get_or_load_custom_func($name, MODULE, PTX)?
    };
}

/// The contiguous slice of `s` of type `T` that `l` describes.
pub(crate) fn contiguous<'a, T: candle_core::cuda_backend::CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: not contiguous");
    };
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// The GPU storage of a tensor's storage.
fn gpu(s: &Storage) -> candle_core::Result<&CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => candle_core::bail!("qlora kernels: a tensor is not on the GPU"),
    }
}

/// Blocks for `n` work items of [`THREADS`] threads each (grid-stride
/// loops cover the rest when the grid is capped).
pub(crate) fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 65_535 * 32) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Dequantizes `numel` NF4 values (codes in `s`/`l`, `scales`) to `dtype`
/// (`f32` or `bf16`).
pub(crate) fn nf4_dequant(
    s: &CudaStorage,
    l: &Layout,
    scales: &DeviceScales,
    numel: usize,
    dtype: DType,
) -> candle_core::Result<CudaStorage> {
    let dev = s.device.clone();
    let packed = contiguous::<u8>(s, l, "nf4 dequant codes")?;
    if packed.len() < numel.div_ceil(2) {
        candle_core::bail!("nf4 dequant: {} bytes for {numel} values", packed.len());
    }
    let table = Nf4Table(NF4_CODE);
    let cfg = grid(numel.div_ceil(2));
    macro_rules! launch {
        ($t:ty, $plain:literal, $dq:literal) => {{
            // SAFETY: every element is written by the kernel.
            let out = unsafe { dev.alloc::<$t>(numel)? };
            match scales {
                DeviceScales::F32(sc) => {
                    let (st, sl) = sc.storage_and_layout();
                    let sc = contiguous::<f32>(gpu(&st)?, sl, "nf4 scales")?;
                    let f = kernel!(dev, $plain);
                    let mut b = f.builder();
                    b.arg(&packed).arg(&sc).arg(&table).arg(&out).arg(&numel);
                    // SAFETY: the arguments match the kernel's signature.
                    unsafe { b.launch(cfg) }.w()?;
                }
                DeviceScales::Double { codes, steps, mean } => {
                    let (cst, cl) = codes.storage_and_layout();
                    let codes = contiguous::<u8>(gpu(&cst)?, cl, "nf4 scale codes")?;
                    let (sst, sl) = steps.storage_and_layout();
                    let steps = contiguous::<f32>(gpu(&sst)?, sl, "nf4 scale steps")?;
                    let f = kernel!(dev, $dq);
                    let mut b = f.builder();
                    b.arg(&packed)
                        .arg(&codes)
                        .arg(&steps)
                        .arg(mean)
                        .arg(&table)
                        .arg(&out)
                        .arg(&numel);
                    // SAFETY: the arguments match the kernel's signature.
                    unsafe { b.launch(cfg) }.w()?;
                }
            }
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    Ok(match dtype {
        DType::F32 => launch!(f32, "nf4_dequant_f32", "nf4_dequant_dq_f32"),
        DType::BF16 => launch!(half::bf16, "nf4_dequant_bf16", "nf4_dequant_dq_bf16"),
        other => candle_core::bail!("nf4 dequant: no GPU kernel for {other:?}"),
    })
}

/// One block per row of `rows` rows.
pub(crate) fn per_row(rows: usize) -> candle_core::Result<LaunchConfig> {
    let rows = u32::try_from(rows)
        .ok()
        .filter(|&r| r < (1 << 31))
        .ok_or_else(|| candle_core::Error::Msg(format!("token nll: {rows} rows")))?;
    Ok(LaunchConfig {
        grid_dim: (rows.max(1), 1, 1),
        block_dim: (NLL_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// `logsumexp(row) - row[target]` of each row of `v` `f32` logits.
pub(crate) fn token_nll(
    s: &CudaStorage,
    l: &Layout,
    v: usize,
    targets: &[u32],
) -> candle_core::Result<CudaStorage> {
    let dev = s.device.clone();
    let x = contiguous::<f32>(s, l, "token nll logits (f32)")?;
    let n = targets.len();
    if x.len() != n * v {
        candle_core::bail!("token nll: {} logits for {n} rows of {v}", x.len());
    }
    let t = dev.clone_htod(targets)?;
    // SAFETY: the kernel writes every row.
    let out = unsafe { dev.alloc::<f32>(n)? };
    if n > 0 {
        let f = kernel!(dev, "token_nll");
        let mut b = f.builder();
        b.arg(&x).arg(&t).arg(&out).arg(&v);
        // SAFETY: the arguments match the kernel's signature.
        unsafe { b.launch(per_row(n)?) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// The gradient of [`token_nll`] for incoming gradients `g` (one per row).
pub(crate) fn token_nll_grad(
    s: &CudaStorage,
    l: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
    v: usize,
    targets: &[u32],
) -> candle_core::Result<CudaStorage> {
    let dev = s.device.clone();
    let x = contiguous::<f32>(s, l, "token nll logits (f32)")?;
    let g = contiguous::<f32>(gs, gl, "token nll gradient (f32)")?;
    let n = targets.len();
    if x.len() != n * v || g.len() != n {
        candle_core::bail!(
            "token nll: {} logits, {} gradients for {n} rows",
            x.len(),
            g.len()
        );
    }
    let t = dev.clone_htod(targets)?;
    // SAFETY: the kernel writes every element of every row.
    let out = unsafe { dev.alloc::<f32>(n * v)? };
    if n > 0 {
        let f = kernel!(dev, "token_nll_grad");
        let mut b = f.builder();
        b.arg(&x).arg(&t).arg(&g).arg(&out).arg(&v);
        // SAFETY: the arguments match the kernel's signature.
        unsafe { b.launch(per_row(n)?) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// The GPU memory of `dev`'s default memory pool (where candle's
/// stream-ordered allocations come from): the most it has held reserved
/// since the process started, and the device's total, in bytes. The CUDA
/// context's own few hundred MiB are in neither pool figure.
pub(crate) fn memory(dev: &candle_core::CudaDevice) -> candle_core::Result<(u64, u64)> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    let (_, total) = ctx.mem_get_info().w()?;
    let mut high: u64 = 0;
    // SAFETY: the device comes from a live context; the attribute is a
    // cuuint64_t, written into `high`.
    unsafe {
        let pool = result::device::get_default_mem_pool(ctx.cu_device()).w()?;
        result::mem_pool::get_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
            (&mut high as *mut u64).cast(),
        )
        .w()?;
    }
    Ok((high, total as u64))
}

/// Rows of `l`'s last dimension: `(rows, row length)`.
pub(crate) fn rows_of(l: &Layout) -> candle_core::Result<(usize, usize)> {
    let d = *l.dims().last().unwrap_or(&1);
    if d == 0 {
        candle_core::bail!("rows of 0 values");
    }
    Ok((l.shape().elem_count() / d, d))
}

/// The kernel name for `dtype`: `{root}_f32` or `{root}_bf16`.
pub(crate) fn name(root: &str, dtype: DType) -> candle_core::Result<String> {
    match dtype {
        DType::F32 => Ok(format!("{root}_f32")),
        DType::BF16 => Ok(format!("{root}_bf16")),
        other => candle_core::bail!("{root}: no GPU kernel for {other:?}"),
    }
}

/// Allocates an output of `n` values of `s`'s dtype (`f32` or `bf16`, as
/// the type `T` in `body`), runs `body`, which launches the kernel that
/// writes it, and wraps it as a storage.
macro_rules! with_out {
    ($s:expr, $n:expr, |$out:ident, $t:ident| $body:block) => {{
        let dev = $s.device.clone();
        match $s.dtype() {
            DType::F32 => {
                type $t = f32;
                // SAFETY: the kernel writes every element.
                let $out = unsafe { dev.alloc::<$t>($n)? };
                $body
                Ok::<CudaStorage, candle_core::Error>(CudaStorage::wrap_cuda_slice($out, dev))
            }
            DType::BF16 => {
                type $t = half::bf16;
                // SAFETY: the kernel writes every element.
                let $out = unsafe { dev.alloc::<$t>($n)? };
                $body
                Ok::<CudaStorage, candle_core::Error>(CudaStorage::wrap_cuda_slice($out, dev))
            }
            other => candle_core::bail!("no GPU kernel for {other:?}"),
        }
    }};
}
pub(crate) use with_out;

/// `softmax(scale * s + mask)` per row (see `super::softmax`).
pub(crate) fn masked_softmax(
    s: &CudaStorage,
    l: &Layout,
    ms: &CudaStorage,
    ml: &Layout,
    (heads, t, mask_rows): (usize, usize, usize),
    scale: f32,
) -> candle_core::Result<CudaStorage> {
    let (rows, keys) = rows_of(l)?;
    if ml.shape().elem_count() != mask_rows * t * keys {
        candle_core::bail!("masked softmax: mask {:?}", ml.dims());
    }
    with_out!(s, rows * keys, |out, T| {
        let x = contiguous::<T>(s, l, "softmax scores")?;
        let m = contiguous::<T>(ms, ml, "softmax mask")?;
        if rows > 0 {
            let f = kernel_fn(&s.device, &name("masked_softmax", s.dtype())?)?;
            let stream = s.device.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&x)
                .arg(&m)
                .arg(&out)
                .arg(&keys)
                .arg(&heads)
                .arg(&t)
                .arg(&mask_rows)
                .arg(&scale);
            // SAFETY: the arguments match the kernel's signature.
            unsafe { b.launch(per_row(rows)?) }.w()?;
        }
    })
}

/// `scale * y * (g - sum(g * y))` per row.
pub(crate) fn softmax_grad(
    y: &CudaStorage,
    l: &Layout,
    g: &CudaStorage,
    gl: &Layout,
    scale: f32,
) -> candle_core::Result<CudaStorage> {
    let (rows, keys) = rows_of(l)?;
    if gl.shape().elem_count() != rows * keys {
        candle_core::bail!("softmax gradient: {:?} for {:?}", gl.dims(), l.dims());
    }
    with_out!(y, rows * keys, |out, T| {
        let yv = contiguous::<T>(y, l, "softmax output")?;
        let gv = contiguous::<T>(g, gl, "softmax gradient")?;
        if rows > 0 {
            let f = kernel_fn(&y.device, &name("softmax_grad", y.dtype())?)?;
            let stream = y.device.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&yv).arg(&gv).arg(&out).arg(&keys).arg(&scale);
            // SAFETY: the arguments match the kernel's signature.
            unsafe { b.launch(per_row(rows)?) }.w()?;
        }
    })
}
