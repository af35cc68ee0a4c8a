//! Driving training: optimizers that own their state, the fine-tune job's pieces (data,
//! schedules, the loop with its checkpoints, evaluation, the default company data set) and
//! the continual-learning pieces built on them.

mod adamw;
pub mod company;
pub mod data;
pub mod eval;
pub mod general;
pub mod job;
pub mod plot;
mod rng;
pub mod schedule;
pub mod trainer;

pub use adamw::{AdamW, ParamState};
pub use rng::SplitMix64;
