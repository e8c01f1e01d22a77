//! AdamW (decoupled weight decay, Loshchilov & Hutter) with its moments in
//! the open, so checkpoints can save and restore them (candle_nn's `AdamW`
//! keeps them private), plus the warmup + cosine schedule and global-norm
//! gradient clipping.
//!
//! ```
//! use qlora_scale::train::optim::lr_at;
//! // 10 warmup steps to 1e-3, cosine to 10% of it at step 100.
//! assert!((lr_at(5, 1e-3, 10, 100, 0.1) - 5e-4).abs() < 1e-12);
//! assert!((lr_at(10, 1e-3, 10, 100, 0.1) - 1e-3).abs() < 1e-12);
//! assert!((lr_at(100, 1e-3, 10, 100, 0.1) - 1e-4).abs() < 1e-12);
//! ```

use std::collections::HashMap;

use candle_core::{Tensor, Var};

/// The learning rate at optimizer step `step` (1-based: the step being
/// taken): linear warmup over `warmup` steps to `peak`, then cosine decay to
/// `peak * min_ratio` at `max_steps`.
pub fn lr_at(step: u64, peak: f64, warmup: u64, max_steps: u64, min_ratio: f64) -> f64 {
    if warmup > 0 && step < warmup {
        return peak * step as f64 / warmup as f64;
    }
    let span = max_steps.saturating_sub(warmup).max(1) as f64;
    let progress = ((step.saturating_sub(warmup)) as f64 / span).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    peak * (min_ratio + (1.0 - min_ratio) * cosine)
}

/// AdamW hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWParams {
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// AdamW over named `Var`s.
#[derive(Debug)]
pub struct AdamW {
    params: AdamWParams,
    vars: Vec<(String, Var)>,
    m: HashMap<String, Tensor>,
    v: HashMap<String, Tensor>,
    t: u64,
}

/// What AdamW keeps between steps: its step count and moments, by name.
#[derive(Clone, Debug)]
pub struct AdamWState {
    /// Steps taken.
    pub t: u64,
    /// First moments.
    pub m: HashMap<String, Tensor>,
    /// Second moments.
    pub v: HashMap<String, Tensor>,
}

impl AdamW {
    /// Zero moments for `vars`.
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> candle_core::Result<Self> {
        let mut m = HashMap::new();
        let mut v = HashMap::new();
        for (name, var) in &vars {
            m.insert(name.clone(), var.as_tensor().zeros_like()?);
            v.insert(name.clone(), var.as_tensor().zeros_like()?);
        }
        Ok(Self {
            params,
            vars,
            m,
            v,
            t: 0,
        })
    }

    /// The optimized variables.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Its state now (the tensors are shared, not copied).
    pub fn state(&self) -> AdamWState {
        AdamWState {
            t: self.t,
            m: self.m.clone(),
            v: self.v.clone(),
        }
    }

    /// Continues from `state`, which must hold both moments of every
    /// variable, each of the variable's shape; on error nothing changes.
    pub fn restore(&mut self, state: AdamWState) -> Result<(), String> {
        for (name, var) in &self.vars {
            for (which, moments) in [("first", &state.m), ("second", &state.v)] {
                match moments.get(name) {
                    None => return Err(format!("no {which} moment for {name}")),
                    Some(t) if t.dims() != var.dims() => {
                        return Err(format!(
                            "{which} moment of {name}: shape {:?}, the adapter's is {:?}",
                            t.dims(),
                            var.dims()
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        // A checkpoint is read on the CPU: the moments go where the
        // adapters are (a GPU run resumes a CPU run's checkpoint and back).
        let place = |moments: HashMap<String, Tensor>| -> Result<HashMap<String, Tensor>, String> {
            self.vars
                .iter()
                .map(|(name, var)| {
                    let t = &moments[name];
                    let t = t
                        .to_device(var.device())
                        .and_then(|t| t.to_dtype(var.dtype()))
                        .map_err(|e| format!("moment of {name}: {e}"))?;
                    Ok((name.clone(), t))
                })
                .collect()
        };
        let (m, v) = (place(state.m)?, place(state.v)?);
        self.t = state.t;
        self.m = m;
        self.v = v;
        Ok(())
    }

    /// One update with gradients `grads` (by name) at learning rate `lr`.
    /// A variable without a gradient is left as it is.
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, lr: f64) -> candle_core::Result<()> {
        self.t += 1;
        let p = self.params;
        let t = self.t as i32;
        let c1 = 1.0 - p.beta1.powi(t);
        let c2 = 1.0 - p.beta2.powi(t);
        for (name, var) in &self.vars {
            let Some(g) = grads.get(name) else { continue };
            let m = self
                .m
                .get(name)
                .ok_or_else(|| candle_core::Error::Msg(format!("no moment for {name}")))?;
            let v = self
                .v
                .get(name)
                .ok_or_else(|| candle_core::Error::Msg(format!("no moment for {name}")))?;
            let m = ((m * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            let v = ((v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let m_hat = (&m / c1)?;
            let v_hat = (&v / c2)?;
            let theta = var.as_tensor();
            let decayed = (theta * (1.0 - lr * p.weight_decay))?;
            let update = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        Ok(())
    }
}

/// The global L2 norm of `grads`.
pub fn global_norm(grads: &HashMap<String, Tensor>) -> candle_core::Result<f64> {
    let mut names: Vec<&String> = grads.keys().collect();
    names.sort();
    // Summed where the gradients are, in `f64`, and read once (on a GPU,
    // one transfer per step instead of one per adapter matrix).
    let mut sum: Option<Tensor> = None;
    for n in names {
        let s = grads[n]
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?;
        sum = Some(match sum {
            Some(acc) => (acc + s)?,
            None => s,
        });
    }
    Ok(sum.map_or(Ok(0.0), |s| s.to_scalar::<f64>())?.sqrt())
}

/// Scales `grads` so their global norm is at most `max_norm`; returns the
/// norm before clipping.
pub fn clip_global_norm(
    grads: &mut HashMap<String, Tensor>,
    max_norm: f64,
) -> candle_core::Result<f64> {
    let norm = global_norm(grads)?;
    if norm.is_finite() && norm > max_norm {
        let s = max_norm / norm;
        for g in grads.values_mut() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}
