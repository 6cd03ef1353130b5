//! Durations (placeholder).
