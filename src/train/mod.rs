//! Driving training: optimizers that own their state, and the continual-learning pieces
//! built on them.

mod adamw;

pub use adamw::{AdamW, ParamState};
