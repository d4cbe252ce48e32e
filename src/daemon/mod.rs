//! Process lifetime shared by every long-running command (`serve`, `change create` following a change, a
//! background `change run`): one shutdown signal set.

pub mod shutdown;
