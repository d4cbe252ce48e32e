//! Process lifetime shared by every long-running command (`serve`, `change create` following a change, a
//! background `change run`): one shutdown signal set.

pub mod event_log;
pub mod shutdown;
