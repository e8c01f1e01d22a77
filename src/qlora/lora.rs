//! LoRA adapters over frozen linear layers.
//!
//! `y = W x + s · B A dropout(x)`, with `A` (`r x in`) Kaiming-uniform as in
//! PEFT, `B` (`out x r`) zero, and `s = alpha / r` (or `alpha / sqrt(r)`
//! with rsLoRA, arXiv:2312.03732). `A` and `B` are trainable `Var`s held in
//! a `VarMap` under PEFT's names. Without dropout the layer runs as one
//! fused op ([`super::lora_op`]).
//!
//! ```
//! use qlora_scale::qlora::lora::{LoraConfig, LoraTarget};
//! let cfg = LoraConfig { rank: 8, alpha: 16.0, ..LoraConfig::default() };
//! assert_eq!(cfg.scale(), 2.0);
//! assert!(cfg.targets_module(LoraTarget::Down));
//! assert!(cfg.adapts_layer(31, 32));
//! assert_eq!(LoraTarget::from_module_name("q_proj"), Some(LoraTarget::Q));
//! ```

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::frozen::{FrozenLinear, FrozenStorage, FrozenWeight};
use super::lora_op::LoraMatmulOp;

/// A linear layer of a Llama-family block that LoRA can adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraTarget {
    /// `self_attn.q_proj`
    Q,
    /// `self_attn.k_proj`
    K,
    /// `self_attn.v_proj`
    V,
    /// `self_attn.o_proj`
    O,
    /// `mlp.gate_proj`
    Gate,
    /// `mlp.up_proj`
    Up,
    /// `mlp.down_proj`
    Down,
}

impl LoraTarget {
    /// All seven linear layers, in block order.
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::Q,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::O,
        LoraTarget::Gate,
        LoraTarget::Up,
        LoraTarget::Down,
    ];

    /// The HF module name (`q_proj`, ..., `down_proj`).
    pub fn module_name(self) -> &'static str {
        SEPARATE_PROJECTIONS[self as usize].module_name()
    }

    /// The path inside a block (`self_attn.q_proj`, `mlp.down_proj`, ...).
    pub fn block_path(self) -> &'static str {
        SEPARATE_PROJECTIONS[self as usize].path
    }

    /// Parses a module name as PEFT's `target_modules` spells it (`q_proj`,
    /// or the short `q`, `gate`, ...).
    pub fn from_module_name(name: &str) -> Option<Self> {
        let short = name.strip_suffix("_proj").unwrap_or(name);
        Some(match short {
            "q" => LoraTarget::Q,
            "k" => LoraTarget::K,
            "v" => LoraTarget::V,
            "o" => LoraTarget::O,
            "gate" => LoraTarget::Gate,
            "up" => LoraTarget::Up,
            "down" => LoraTarget::Down,
            _ => return None,
        })
    }
}

/// A linear layer of a block as a checkpoint stores it: one per target
/// (Llama), or fused (Phi-3's `qkv_proj` and `gate_up_proj`), whose output
/// is its targets' outputs concatenated in order. LoRA adapts a projection
/// as a whole, under its own name, when any of its targets is selected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Projection {
    /// The path inside a block (`self_attn.qkv_proj`).
    pub path: &'static str,
    /// The targets whose outputs it computes, in output order.
    pub targets: &'static [LoraTarget],
}

impl Projection {
    /// The module name, as PEFT's `target_modules` spells it (`qkv_proj`).
    pub fn module_name(&self) -> &'static str {
        self.path.rsplit('.').next().unwrap_or(self.path)
    }
}

const fn separate(t: &'static [LoraTarget; 1], path: &'static str) -> Projection {
    Projection { path, targets: t }
}

/// The seven projections of a Llama block, one per target.
pub const SEPARATE_PROJECTIONS: [Projection; 7] = [
    separate(&[LoraTarget::Q], "self_attn.q_proj"),
    separate(&[LoraTarget::K], "self_attn.k_proj"),
    separate(&[LoraTarget::V], "self_attn.v_proj"),
    separate(&[LoraTarget::O], "self_attn.o_proj"),
    separate(&[LoraTarget::Gate], "mlp.gate_proj"),
    separate(&[LoraTarget::Up], "mlp.up_proj"),
    separate(&[LoraTarget::Down], "mlp.down_proj"),
];

/// The four projections of a Phi-3 block: q, k and v fused, o, gate and up
/// fused, down.
pub const FUSED_PROJECTIONS: [Projection; 4] = [
    Projection {
        path: "self_attn.qkv_proj",
        targets: &[LoraTarget::Q, LoraTarget::K, LoraTarget::V],
    },
    separate(&[LoraTarget::O], "self_attn.o_proj"),
    Projection {
        path: "mlp.gate_up_proj",
        targets: &[LoraTarget::Gate, LoraTarget::Up],
    },
    separate(&[LoraTarget::Down], "mlp.down_proj"),
];

/// LoRA hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r`.
    pub rank: usize,
    /// `alpha`; the LoRA path is scaled by `alpha / r` (or `alpha / sqrt(r)`).
    pub alpha: f64,
    /// Dropout probability on the LoRA path's input, in training only.
    pub dropout: f32,
    /// Which linear layers get adapters.
    pub targets: Vec<LoraTarget>,
    /// Adapt only the last `n` blocks; `None` adapts all.
    pub last_layers: Option<usize>,
    /// rsLoRA scaling `alpha / sqrt(r)`.
    pub use_rslora: bool,
    /// Seed of the `A` initialisation and of the dropout masks.
    pub seed: u64,
}

impl Default for LoraConfig {
    /// Rank 8, alpha 16, no dropout, all seven linears, all layers.
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: LoraTarget::ALL.to_vec(),
            last_layers: None,
            use_rslora: false,
            seed: 0,
        }
    }
}

impl LoraConfig {
    /// The LoRA path's scale.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// Whether `target` gets an adapter.
    pub fn targets_module(&self, target: LoraTarget) -> bool {
        self.targets.contains(&target)
    }

    /// Whether `p` gets an adapter: any of its targets does.
    pub fn targets_projection(&self, p: &Projection) -> bool {
        p.targets.iter().any(|t| self.targets_module(*t))
    }

    /// Whether block `layer` (of `num_layers`) gets adapters.
    pub fn adapts_layer(&self, layer: usize, num_layers: usize) -> bool {
        match self.last_layers {
            None => true,
            Some(n) => layer + n >= num_layers,
        }
    }
}

/// PEFT's key of a LoRA matrix of the projection at `path` in a block:
/// `base_model.model.model.layers.N.PATH.lora_A.weight`.
pub fn peft_key(layer: usize, path: &str, matrix: char) -> String {
    format!("base_model.model.model.layers.{layer}.{path}.lora_{matrix}.weight")
}

/// The trainable matrices of one adapter.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `A`, `(r, in)`.
    pub a: Var,
    /// `B`, `(out, r)`.
    pub b: Var,
}

impl LoraAdapter {
    /// `A` Kaiming-uniform (PEFT: `kaiming_uniform_(a=sqrt(5))`, i.e. bound
    /// `1/sqrt(in)`), `B` zero, seeded.
    pub fn init(
        rank: usize,
        in_dim: usize,
        out_dim: usize,
        dtype: DType,
        device: &Device,
        rng: &mut StdRng,
    ) -> candle_core::Result<Self> {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let a: Vec<f64> = (0..rank * in_dim)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let a = Tensor::from_vec(a, (rank, in_dim), device)?.to_dtype(dtype)?;
        let b = Tensor::zeros((out_dim, rank), dtype, device)?;
        Ok(Self {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
        })
    }
}

/// A dropout mask for the LoRA path: Bernoulli keep mask scaled by
/// `1/(1-p)`, deterministic in `seed` (so a checkpointed block recomputes
/// the same mask).
pub fn dropout_mask(
    shape: &[usize],
    p: f32,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let keep = 1.0 / (1.0 - p);
    let m: Vec<f32> = (0..n)
        .map(|_| if rng.random::<f32>() < p { 0.0 } else { keep })
        .collect();
    Tensor::from_vec(m, shape, device)?.to_dtype(dtype)
}

/// A frozen linear layer with an optional LoRA adapter.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    base: FrozenLinear,
    bias: Option<Tensor>,
    adapter: Option<LoraAdapter>,
    scale: f64,
    merged: bool,
}

impl LoraLinear {
    /// A layer over `base` (with an optional frozen bias) and `adapter`.
    pub fn new(
        base: FrozenLinear,
        bias: Option<Tensor>,
        adapter: Option<LoraAdapter>,
        scale: f64,
    ) -> Self {
        Self {
            base,
            bias,
            adapter,
            scale,
            merged: false,
        }
    }

    /// The frozen base.
    pub fn base(&self) -> &FrozenLinear {
        &self.base
    }

    /// The frozen bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The adapter, if any.
    pub fn adapter(&self) -> Option<&LoraAdapter> {
        self.adapter.as_ref()
    }

    /// Whether the adapter is currently merged into the base.
    pub fn is_merged(&self) -> bool {
        self.merged
    }

    /// Forward with explicit adapter matrices `(a, b)` (the `Var`s, or the
    /// recomputation's copies under checkpointing) and an optional dropout
    /// mask for the LoRA input.
    ///
    /// With the adapter unmerged and a base the fused op supports
    /// ([`LoraMatmulOp::supports`]), `x · Wᵀ + s · (x ⊙ dropout) · Aᵀ · Bᵀ`
    /// is one graph node ([`super::lora_op`]), the bias added after it;
    /// otherwise the composition of [`Self::forward_unfused`].
    pub fn forward_with(
        &self,
        x: &Tensor,
        adapter: Option<(&Tensor, &Tensor)>,
        dropout: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        match adapter {
            Some((a, b)) if self.uses_fused_op(x, adapter, dropout) => {
                let op = LoraMatmulOp::new(self.base.weight().clone(), self.scale)
                    .with_cpu_matmul(self.base.cpu_matmul())
                    .with_dropout(dropout)?;
                let y = op.apply(x, a, b)?;
                match &self.bias {
                    Some(bias) => y.broadcast_add(bias),
                    None => Ok(y),
                }
            }
            _ => self.forward_unfused(x, adapter, dropout),
        }
    }

    /// Whether [`Self::forward_with`] on these arguments takes the fused
    /// op: an unmerged adapter, operands (and the dropout mask, if any) of
    /// one dtype and shape on the CPU, and a base [`LoraMatmulOp::supports`].
    pub fn uses_fused_op(
        &self,
        x: &Tensor,
        adapter: Option<(&Tensor, &Tensor)>,
        dropout: Option<&Tensor>,
    ) -> bool {
        let Some((a, b)) = adapter else {
            return false;
        };
        !self.merged
            && dropout.is_none_or(|m| m.dtype() == x.dtype() && m.dims() == x.dims())
            && a.dtype() == x.dtype()
            && b.dtype() == x.dtype()
            && a.device().is_cpu()
            && b.device().is_cpu()
            && LoraMatmulOp::supports(self.base.weight(), self.base.storage(), x)
    }

    /// The LoRA forward composed of Candle ops: the frozen matmul, the bias,
    /// `x · Aᵀ`, `· Bᵀ`, `affine(s)` and `add` (and the dropout mask's
    /// `mul`). The path for bases the fused op does not take, and the
    /// reference of its tests.
    pub fn forward_unfused(
        &self,
        x: &Tensor,
        adapter: Option<(&Tensor, &Tensor)>,
        dropout: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let mut y = self.base.forward(x)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        if let (Some((a, b)), false) = (adapter, self.merged) {
            let xin = match dropout {
                Some(mask) => (x * mask)?,
                None => x.clone(),
            };
            // `f32` master weights under 16-bit compute: cast (the casts'
            // backward returns the gradients in `f32`).
            let (a, b) = (a.to_dtype(x.dtype())?, b.to_dtype(x.dtype())?);
            let lora = xin.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)?;
            y = (y + lora.affine(self.scale, 0.0)?)?;
        }
        Ok(y)
    }

    /// Forward through the layer's own adapter `Var`s.
    pub fn forward(&self, x: &Tensor, dropout: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let ab = self
            .adapter
            .as_ref()
            .map(|ad| (ad.a.as_tensor(), ad.b.as_tensor()));
        self.forward_with(x, ab, dropout)
    }

    /// The dense `W + s · B A` (`f32`), whether or not merged.
    pub fn merged_weight(&self) -> candle_core::Result<Tensor> {
        let w = self.base.weight().dequantize(DType::F32, &Device::Cpu)?;
        match (&self.adapter, self.merged) {
            (Some(ad), false) => {
                let ba =
                    ad.b.as_tensor()
                        .to_dtype(DType::F32)?
                        .matmul(&ad.a.as_tensor().to_dtype(DType::F32)?)?;
                w + ba.affine(self.scale, 0.0)?
            }
            _ => Ok(w),
        }
    }

    /// Merges the adapter into a dequantized `f32` base: the forward then
    /// uses `W + s · B A` and skips the LoRA path. No-op without adapter.
    pub fn merge(&mut self) -> candle_core::Result<()> {
        if self.adapter.is_none() || self.merged {
            return Ok(());
        }
        let w = self.merged_weight()?;
        self.base = FrozenLinear::from_weight(
            std::sync::Arc::new(FrozenWeight::Dense(w)),
            FrozenStorage::F32,
        );
        self.merged = true;
        Ok(())
    }

    /// Undoes [`Self::merge`]: the base becomes the dense `W` again (`f32`;
    /// the original quantized storage is not restored).
    pub fn unmerge(&mut self) -> candle_core::Result<()> {
        let Some(ad) = (self.merged).then_some(()).and(self.adapter.as_ref()) else {
            return Ok(());
        };
        let ba =
            ad.b.as_tensor()
                .to_dtype(DType::F32)?
                .matmul(&ad.a.as_tensor().to_dtype(DType::F32)?)?;
        let w = (self.base.weight().dequantize(DType::F32, &Device::Cpu)?
            - ba.affine(self.scale, 0.0)?)?;
        self.base = FrozenLinear::from_weight(
            std::sync::Arc::new(FrozenWeight::Dense(w)),
            FrozenStorage::F32,
        );
        self.merged = false;
        Ok(())
    }
}
