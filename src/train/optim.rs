//! AdamW over the LoRA tensors, linear warmup + cosine decay, global-norm clipping, and gradient
//! accumulation that carries nothing between micro-batches but the summed gradients.

use candle_core::{Result, Tensor, Var};

/// Learning rate at optimizer step `step` (0-based) of `total`: linear warmup, then cosine to 0.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / decay as f64).min(1.0);
        self.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// Sums micro-batch gradients. Holds detached tensors only: no graph survives a micro-batch.
#[derive(Default)]
pub struct Accumulator {
    sums: Option<Vec<Tensor>>,
    pub micro_batches: usize,
}

impl Accumulator {
    pub fn add(&mut self, grads: Vec<Tensor>) -> Result<()> {
        let grads: Vec<Tensor> = grads.into_iter().map(|g| g.detach()).collect();
        self.sums = Some(match self.sums.take() {
            None => grads,
            Some(s) => s.iter().zip(&grads).map(|(a, b)| a + b).collect::<Result<_>>()?,
        });
        self.micro_batches += 1;
        Ok(())
    }

    /// Takes the summed gradients, leaving the accumulator empty.
    pub fn take(&mut self) -> Option<Vec<Tensor>> {
        self.micro_batches = 0;
        self.sums.take()
    }
}

/// L2 norm over all gradients together.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads {
        sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(sq.sqrt())
}

/// Scales `grads` so their global norm is at most `max_norm`; returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}

/// Decoupled-weight-decay Adam (Loshchilov & Hutter), PyTorch's defaults for betas and eps.
pub struct AdamW {
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: i32,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, weight_decay: f64) -> Result<Self> {
        let m = vars.iter().map(|v| v.as_tensor().zeros_like()).collect::<Result<_>>()?;
        let v = vars.iter().map(|v| v.as_tensor().zeros_like()).collect::<Result<_>>()?;
        Ok(Self { vars, m, v, t: 0, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay })
    }

    /// The moments and step count, for a checkpoint: (m, v, t).
    pub fn state(&self) -> (&[Tensor], &[Tensor], i32) {
        (&self.m, &self.v, self.t)
    }

    /// Restores what [`AdamW::state`] gave.
    pub fn restore(&mut self, m: Vec<Tensor>, v: Vec<Tensor>, t: i32) -> Result<()> {
        if m.len() != self.vars.len() || v.len() != self.vars.len() {
            candle_core::bail!("optimizer state has {} moments for {} tensors", m.len(), self.vars.len());
        }
        for (i, var) in self.vars.iter().enumerate() {
            if m[i].shape() != var.shape() || v[i].shape() != var.shape() {
                candle_core::bail!("optimizer state shape mismatch at tensor {i}");
            }
        }
        (self.m, self.v, self.t) = (m, v, t);
        Ok(())
    }

    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t);
        let bc2 = 1.0 - self.beta2.powi(self.t);
        for (i, var) in self.vars.iter().enumerate() {
            let g = &grads[i];
            self.m[i] = ((&self.m[i] * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            self.v[i] = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let mhat = (&self.m[i] / bc1)?;
            let vhat = (&self.v[i] / bc2)?;
            let update = (mhat / (vhat.sqrt()? + self.eps)?)?;
            let w = var.as_tensor();
            let decayed = (w * (1.0 - lr * self.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        let s = Schedule { lr: 1.0, warmup_steps: 4, total_steps: 14 };
        assert_eq!(s.lr_at(0), 0.25);
        assert_eq!(s.lr_at(3), 1.0);
        assert!((s.lr_at(4) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(9) - 0.5).abs() < 1e-12);
        assert!(s.lr_at(14).abs() < 1e-12);
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let mut g = vec![Tensor::new(&[3f32, 0.0], &Device::Cpu).unwrap(), Tensor::new(&[4f32], &Device::Cpu).unwrap()];
        let before = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((before - 5.0).abs() < 1e-6);
        assert!((global_norm(&g).unwrap() - 1.0).abs() < 1e-5);
    }

    #[test]
    fn adamw_first_step_moves_by_lr() {
        // With bias correction, Adam's first update is lr * sign(g).
        let v = Var::new(&[1f32, -1.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![v.clone()], 0.0).unwrap();
        opt.step(&[Tensor::new(&[0.5f32, -2.0], &Device::Cpu).unwrap()], 0.1).unwrap();
        let w: Vec<f32> = v.as_tensor().to_vec1().unwrap();
        assert!((w[0] - 0.9).abs() < 1e-5 && (w[1] + 0.9).abs() < 1e-5, "{w:?}");
    }
}
