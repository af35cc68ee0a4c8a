//! Driving training: optimizers that own their state, and the continual-learning pieces
//! built on them.

mod adamw;
pub mod data;

pub use adamw::{AdamW, ParamState};
