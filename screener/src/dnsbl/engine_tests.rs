//! Engine tests with scripted answers under paused time.
