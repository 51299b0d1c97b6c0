//! The daemon's only candle call: reading the routing weights a trace recorded.
//! `moerge_engine::routing::RoutingRecord` hands them over as a candle `Tensor`; once the
//! engine offers them as plain rows (`Vec<Vec<f32>>`), this file goes away and the daemon
//! stops depending on candle-core.

use moerge_engine::routing::RoutingRecord;

use super::error::ServeError;

/// `record.weights` (`[rows, units]`) as rows.
pub(crate) fn routing_rows(record: &RoutingRecord) -> Result<Vec<Vec<f32>>, ServeError> {
    record
        .weights
        .to_dtype(candle_core::DType::F32)
        .and_then(|t| t.to_vec2::<f32>())
        .map_err(|e| ServeError::Internal(format!("routing weights of {}: {e}", record.module)))
}
