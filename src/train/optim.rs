//! Optimizers over the adapter map: AdamW, Adam and SGD, following MLX's
//! definitions (`mlx.optimizers`: no bias correction, decoupled weight decay),
//! so runs compare with mlx-lm's. The state is a map too, so it can be
//! checkpointed next to the adapter.

use std::collections::HashMap;
use std::rc::Rc;

use mlx_rs::Array;

use super::lora::AdapterParams;
use crate::config::Optimizer as OptimizerKind;
use crate::model::ModelError;

const BETA1: f32 = 0.9;
const BETA2: f32 = 0.999;
const EPS: f32 = 1e-8;
/// MLX's AdamW default.
const WEIGHT_DECAY: f32 = 0.01;

#[derive(Debug)]
pub struct Optimizer {
    pub kind: OptimizerKind,
    /// First and second moments, `{name}.m1` / `{name}.m2`.
    pub state: HashMap<Rc<str>, Array>,
}

impl Optimizer {
    pub fn new(kind: OptimizerKind) -> Self {
        Self {
            kind,
            state: HashMap::new(),
        }
    }

    /// One update of every parameter that has a gradient.
    pub fn step(&mut self, params: &mut AdapterParams, grads: &HashMap<Rc<str>, Array>, learning_rate: f32) -> Result<(), ModelError> {
        let lr = Array::from_f32(learning_rate);
        for (name, grad) in grads {
            let Some(param) = params.get(name) else { continue };
            let updated = match self.kind {
                OptimizerKind::Sgd => param.subtract(grad.multiply(&lr)?)?,
                OptimizerKind::Adam | OptimizerKind::Adamw => {
                    let m1_key: Rc<str> = format!("{name}.m1").into();
                    let m2_key: Rc<str> = format!("{name}.m2").into();
                    let zeros = || mlx_rs::ops::zeros_like(grad);
                    let m1 = match self.state.get(&m1_key) {
                        Some(m) => m.clone(),
                        None => zeros()?,
                    };
                    let m2 = match self.state.get(&m2_key) {
                        Some(m) => m.clone(),
                        None => zeros()?,
                    };
                    let m1 = m1.multiply(Array::from_f32(BETA1))?.add(grad.multiply(Array::from_f32(1.0 - BETA1))?)?;
                    let m2 = m2.multiply(Array::from_f32(BETA2))?.add(grad.square()?.multiply(Array::from_f32(1.0 - BETA2))?)?;
                    let direction = m1.divide(m2.sqrt()?.add(Array::from_f32(EPS))?)?;
                    let base = if self.kind == OptimizerKind::Adamw {
                        param.multiply(Array::from_f32(1.0 - learning_rate * WEIGHT_DECAY))?
                    } else {
                        param.clone()
                    };
                    self.state.insert(m1_key, m1);
                    self.state.insert(m2_key, m2);
                    base.subtract(direction.multiply(&lr)?)?
                }
            };
            params.insert(name.clone(), updated);
        }
        Ok(())
    }
}
