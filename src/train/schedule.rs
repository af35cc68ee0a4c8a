//! Learning-rate schedules: a linear warmup from 0 to the peak, then cosine, linear or
//! constant to the last step, as transformers' `get_{cosine,linear,constant}_schedule_with_warmup`.

use crate::{Error, Result};

/// The shape after the warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    /// Half a cosine from the peak to 0 at the last step.
    Cosine,
    /// A straight line from the peak to 0 at the last step.
    Linear,
    /// The peak to the end.
    Constant,
}

impl ScheduleKind {
    pub fn name(self) -> &'static str {
        match self {
            ScheduleKind::Cosine => "cosine",
            ScheduleKind::Linear => "linear",
            ScheduleKind::Constant => "constant",
        }
    }
}

impl std::str::FromStr for ScheduleKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<ScheduleKind> {
        match s {
            "cosine" => Ok(ScheduleKind::Cosine),
            "linear" => Ok(ScheduleKind::Linear),
            "constant" => Ok(ScheduleKind::Constant),
            other => Err(Error::InvalidArgument(format!("unknown schedule {other:?}: cosine, linear or constant"))),
        }
    }
}

/// The learning rate of every step of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub peak: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// `Err` for a peak that is not finite and positive, no steps, or a warmup longer than the run.
    pub fn new(kind: ScheduleKind, peak: f64, warmup_steps: u64, total_steps: u64) -> Result<Schedule> {
        if !(peak.is_finite() && peak > 0.0) {
            return Err(Error::InvalidArgument(format!("the learning rate must be finite and positive, not {peak}")));
        }
        if total_steps == 0 {
            return Err(Error::InvalidArgument("a run needs at least one step".into()));
        }
        if warmup_steps > total_steps {
            return Err(Error::InvalidArgument(format!("{warmup_steps} warmup steps in a run of {total_steps}")));
        }
        Ok(Schedule { kind, peak, warmup_steps, total_steps })
    }

    /// The rate of optimizer step `step` (counted from 0), as transformers computes it at
    /// the scheduler's `step`-th call.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak * step as f64 / self.warmup_steps.max(1) as f64;
        }
        let decay = (self.total_steps - self.warmup_steps).max(1) as f64;
        let progress = (step - self.warmup_steps) as f64 / decay;
        let factor = match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => (1.0 - progress).max(0.0),
            ScheduleKind::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        };
        self.peak * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay_to_zero() {
        let s = Schedule::new(ScheduleKind::Cosine, 1e-3, 10, 110).unwrap();
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 5e-4).abs() < 1e-15);
        assert_eq!(s.lr(10), 1e-3);
        assert!((s.lr(60) - 5e-4).abs() < 1e-12);
        assert!(s.lr(110).abs() < 1e-15);
        let l = Schedule::new(ScheduleKind::Linear, 1.0, 0, 4).unwrap();
        assert_eq!([l.lr(0), l.lr(1), l.lr(2), l.lr(4)], [1.0, 0.75, 0.5, 0.0]);
        let c = Schedule::new(ScheduleKind::Constant, 2.0, 2, 4).unwrap();
        assert_eq!([c.lr(1), c.lr(3)], [1.0, 2.0]);
        assert!(Schedule::new(ScheduleKind::Cosine, f64::NAN, 0, 1).is_err());
        assert!(Schedule::new(ScheduleKind::Cosine, 1.0, 5, 4).is_err());
        assert!("step".parse::<ScheduleKind>().is_err());
    }
}
