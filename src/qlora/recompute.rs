//! Gradient checkpointing per decoder block.
//!
//! Candle has none. [`CheckpointOp`] is a `CustomOp2` over the block input
//! `x` and the block's adapter matrices packed into one vector `p`: its
//! forward runs the block without recording a graph, so only `x` is kept;
//! its backward recomputes the block with `x` and each adapter matrix of
//! `p` as fresh variables and returns `dL/dx` and `dL/dp`. Candle's own
//! backward of the packing (`cat` of flattened `Var`s) then routes `dL/dp`
//! to every adapter, so the caller's `loss.backward()` sees the same
//! gradients as without checkpointing.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Storage, Tensor, Var};

use super::llama::{Block, BlockCtx};

/// Checkpointed application of one [`Block`].
#[derive(Debug, Clone)]
pub struct CheckpointOp {
    block: Arc<Block>,
    ctx: BlockCtx,
    shapes: Vec<Shape>,
}

fn tensor_from_cpu(s: &CpuStorage, l: &Layout) -> candle_core::Result<Tensor> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("checkpoint: input must be contiguous");
    };
    let dev = candle_core::Device::Cpu;
    match s {
        CpuStorage::F32(v) => Tensor::from_slice(&v[a..b], l.shape(), &dev),
        CpuStorage::F64(v) => Tensor::from_slice(&v[a..b], l.shape(), &dev),
        CpuStorage::BF16(v) => Tensor::from_slice(&v[a..b], l.shape(), &dev),
        CpuStorage::F16(v) => Tensor::from_slice(&v[a..b], l.shape(), &dev),
        other => candle_core::bail!("checkpoint: unsupported dtype {:?}", other.dtype()),
    }
}

fn unpack(p: &Tensor, shapes: &[Shape]) -> candle_core::Result<Vec<Tensor>> {
    let mut off = 0;
    shapes
        .iter()
        .map(|s| {
            let n = s.elem_count();
            let t = p.narrow(0, off, n)?.reshape(s)?;
            off += n;
            Ok(t)
        })
        .collect()
}

impl CheckpointOp {
    /// Applies `block` to `x` with checkpointing: the result carries the
    /// gradients of `x` and of the block's adapters.
    pub(crate) fn apply(
        block: Arc<Block>,
        ctx: BlockCtx,
        x: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let params = block.adapter_tensors();
        let shapes: Vec<Shape> = params.iter().map(|t| t.shape().clone()).collect();
        let packed = if params.is_empty() {
            // A block without adapters: a one-element constant stands in for
            // the packed adapters so the op keeps one signature.
            Tensor::zeros(1, x.dtype(), x.device())?
        } else {
            let flat = params
                .iter()
                .map(|t| t.flatten_all())
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&flat, 0)?
        };
        let op = CheckpointOp { block, ctx, shapes };
        x.contiguous()?.apply_op2(&packed, op)
    }
}

impl CustomOp2 for CheckpointOp {
    fn name(&self) -> &'static str {
        "qlora-checkpointed-block"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        // Fresh, untracked tensors: no graph is recorded.
        let x = tensor_from_cpu(s1, l1)?;
        let p = tensor_from_cpu(s2, l2)?;
        let params = unpack(&p, &self.shapes)?;
        let y = self.block.forward_with(&x, &params, &self.ctx, None)?;
        let shape = y.shape().clone();
        let (ys, yl) = y.storage_and_layout();
        let out = match (&*ys, yl.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => CpuStorage::F32(v[a..b].to_vec()),
            (Storage::Cpu(CpuStorage::F64(v)), Some((a, b))) => CpuStorage::F64(v[a..b].to_vec()),
            (Storage::Cpu(CpuStorage::BF16(v)), Some((a, b))) => CpuStorage::BF16(v[a..b].to_vec()),
            (Storage::Cpu(CpuStorage::F16(v)), Some((a, b))) => CpuStorage::F16(v[a..b].to_vec()),
            _ => candle_core::bail!("checkpoint: unexpected block output storage"),
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        // Untracked tensors over contiguous copies (`x * 1 + 0`, exact):
        // no graph is recorded.
        let fresh = |s: &candle_core::CudaStorage, l: &Layout| -> candle_core::Result<Tensor> {
            Ok(Tensor::from_storage(
                Storage::Cuda(s.affine(l, 1.0, 0.0)?),
                l.shape().clone(),
                candle_core::op::BackpropOp::none(),
                false,
            ))
        };
        let x = fresh(s1, l1)?;
        let p = fresh(s2, l2)?;
        let params = unpack(&p, &self.shapes)?;
        let y = self.block.forward_with(&x, &params, &self.ctx, None)?;
        let shape = y.shape().clone();
        let (ys, yl) = y.storage_and_layout();
        let Storage::Cuda(c) = &*ys else {
            candle_core::bail!("checkpoint: block output left the GPU");
        };
        Ok((c.affine(yl, 1.0, 0.0)?, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let xv = Var::from_tensor(&x.detach())?;
        // One variable per adapter matrix, not slices of one packed
        // variable: Candle's backward of a slice pads its gradient with
        // zeros to the packed length and adds it up, a full-length zero
        // fill, copy and sum per matrix (14 per Llama block), all on the
        // calling thread.
        let vars = unpack(&p.detach(), &self.shapes)?
            .iter()
            .map(Var::from_tensor)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let params: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = self
            .block
            .forward_with(xv.as_tensor(), &params, &self.ctx, None)?;
        // d(sum(y * g))/dθ = gᵀ dy/dθ: one backward of the recomputed block.
        let grads = (y * grad.detach())?.sum_all()?.backward()?;
        let gx = grads.get(xv.as_tensor()).cloned();
        let gp = if self.shapes.is_empty() {
            None
        } else {
            let flat = params
                .iter()
                .map(|t| match grads.get(t) {
                    Some(g) => g.flatten_all(),
                    None => t.zeros_like()?.flatten_all(),
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Some(Tensor::cat(&flat, 0)?)
        };
        Ok((gx, gp))
    }
}
