//! Tests against a real rbldnsd.
