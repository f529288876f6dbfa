//! Learning-rate schedules. They run per optimizer step; across federated
//! rounds the round engine passes a step offset, so the cosine spans the
//! whole run rather than restarting every round.

use crate::config::{LrSchedule, TrainConfig};

#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub kind: LrSchedule,
    pub peak: f32,
    pub floor: f32,
    pub warmup_steps: u64,
    /// Steps of the whole run (all rounds), where the cosine reaches `floor`.
    pub total_steps: u64,
}

impl Schedule {
    pub fn from_config(config: &TrainConfig, total_steps: u64) -> Self {
        Self {
            kind: config.lr_schedule,
            peak: config.learning_rate as f32,
            floor: config.learning_rate_min as f32,
            warmup_steps: u64::from(config.warmup_steps),
            total_steps: total_steps.max(1),
        }
    }

    /// The learning rate of global step `step` (0-based).
    pub fn learning_rate(&self, step: u64) -> f32 {
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f32 / self.warmup_steps as f32;
        }
        match self.kind {
            LrSchedule::Constant => self.peak,
            LrSchedule::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
                let progress = ((step - self.warmup_steps) as f32 / span as f32).min(1.0);
                self.floor + 0.5 * (self.peak - self.floor) * (1.0 + (std::f32::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_warms_up_then_decays_to_the_floor() {
        let s = Schedule {
            kind: LrSchedule::Cosine,
            peak: 1.0,
            floor: 0.1,
            warmup_steps: 10,
            total_steps: 110,
        };
        assert!((s.learning_rate(0) - 0.1).abs() < 1e-6);
        assert!((s.learning_rate(9) - 1.0).abs() < 1e-6);
        assert!((s.learning_rate(10) - 1.0).abs() < 1e-6);
        assert!((s.learning_rate(60) - 0.55).abs() < 1e-5);
        assert!((s.learning_rate(110) - 0.1).abs() < 1e-6);
        assert!((s.learning_rate(500) - 0.1).abs() < 1e-6);
        let constant = Schedule { kind: LrSchedule::Constant, warmup_steps: 0, ..s };
        assert_eq!(constant.learning_rate(77), 1.0);
    }
}
