//! netsim: an in-memory network (links with latency, loss, bandwidth, partitions and churn)
//! and a scenario runner for `blossom-p2p simulate`. Filled by the gossip-learning issue.
