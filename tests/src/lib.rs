//! Helpers shared by the integration tests: network namespaces, child
//! processes and pinned objects, each removed by a guard on drop.

pub mod bench;
pub mod netns;
