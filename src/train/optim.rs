//! Optimizers over the adapter map: AdamW, Adam and SGD, following MLX's
//! definitions (`mlx.optimizers`: no bias correction, decoupled weight decay),
//! so runs compare with mlx-lm's. The state is a map too, so it can be
//! checkpointed next to the adapter.

use std::collections::HashMap;
use std::rc::Rc;

use mlx_rs::Array;
use mlx_rs::error::Exception;

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
            let moments = self.moments(name, grad)?;
            let (updated, moments) = update(self.kind, param, grad, moments.as_ref().map(|(m1, m2)| (m1, m2)), &lr)?;
            self.set_moments(name, moments);
            params.insert(name.clone(), updated);
        }
        Ok(())
    }

    /// The moments of `name` (zeros before its first step), or `None` for SGD.
    pub fn moments(&self, name: &str, grad: &Array) -> Result<Option<(Array, Array)>, ModelError> {
        if self.kind == OptimizerKind::Sgd {
            return Ok(None);
        }
        let moment = |suffix: &str| -> Result<Array, ModelError> {
            match self.state.get(format!("{name}.{suffix}").as_str()) {
                Some(m) => Ok(m.clone()),
                None => Ok(mlx_rs::ops::zeros_like(grad)?),
            }
        };
        Ok(Some((moment("m1")?, moment("m2")?)))
    }

    pub fn set_moments(&mut self, name: &str, moments: Option<(Array, Array)>) {
        if let Some((m1, m2)) = moments {
            self.state.insert(format!("{name}.m1").into(), m1);
            self.state.insert(format!("{name}.m2").into(), m2);
        }
    }
}

/// One parameter's update at learning rate `lr` (a scalar array, so that a
/// compiled update takes it as an input): the new value and, for Adam and
/// AdamW, the new first and second moments (`moments` are the old ones).
pub fn update(kind: OptimizerKind, param: &Array, grad: &Array, moments: Option<(&Array, &Array)>, lr: &Array) -> Result<(Array, Option<(Array, Array)>), Exception> {
    if kind == OptimizerKind::Sgd {
        return Ok((param.subtract(grad.multiply(lr)?)?, None));
    }
    let Some((m1, m2)) = moments else {
        return Err(Exception::custom("an Adam update needs the parameter's moments"));
    };
    let m1 = m1.multiply(Array::from_f32(BETA1))?.add(grad.multiply(Array::from_f32(1.0 - BETA1))?)?;
    let m2 = m2.multiply(Array::from_f32(BETA2))?.add(grad.square()?.multiply(Array::from_f32(1.0 - BETA2))?)?;
    let direction = m1.divide(m2.sqrt()?.add(Array::from_f32(EPS))?)?;
    let base = if kind == OptimizerKind::Adamw {
        param.multiply(Array::from_f32(1.0).subtract(lr.multiply(Array::from_f32(WEIGHT_DECAY))?)?)?
    } else {
        param.clone()
    };
    Ok((base.subtract(direction.multiply(lr)?)?, Some((m1, m2))))
}
