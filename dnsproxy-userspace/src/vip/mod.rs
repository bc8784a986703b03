//! VIP → real address: what the data path's `dp_vips`/`dp_services` maps must hold
//! (`plan`, pure), and the task that resolves backends and keeps the maps current
//! (`sync`).
pub mod plan;
pub mod sync;
