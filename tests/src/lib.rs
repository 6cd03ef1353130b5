//! Helpers shared by the integration tests: network namespaces, child
//! processes and pinned objects, each removed by a guard on drop.

pub mod netns;
pub mod smtp_peers;
