//! Request routing between replicas of one model, as an LLM router does it in front of real
//! replicas (docs/scale-out.md runs the vLLM router in front of minserve; docs/simulator.md
//! compares the two).
//!
//! - **Round robin**: replica after replica, blind to load and to what each one caches.
//! - **Least outstanding tokens**: to the replica with the fewest tokens still to compute for
//!   the requests it holds: each one's prompt until it finishes, and its tokens not yet
//!   generated (what a router outside the engine can count from the responses it relays).
//! - **Prefix-aware**: a request whose prompt starts with a shared prefix goes where that
//!   prefix went before, so one replica keeps it cached instead of every replica holding a
//!   copy; the first request of a prefix, requests without one, and requests whose sticky
//!   replica is overloaded (more outstanding tokens than `BALANCE_RELATIVE` times the least
//!   loaded one's, and more than `BALANCE_ABSOLUTE_TOKENS` beyond it) go to the least loaded.
//!   The vLLM and SGLang routers' `cache_aware` policy works the same way on prompt text with a
//!   radix tree per replica; the simulator knows each request's prefix group instead of
//!   matching text.

use std::collections::HashMap;

use crate::workload::RequestSpec;

/// The prefix-aware router leaves a sticky replica when it holds this many times the least
/// loaded one's outstanding tokens ...
pub const BALANCE_RELATIVE: f64 = 1.5;
/// ... and this many more.
pub const BALANCE_ABSOLUTE_TOKENS: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingPolicy {
    RoundRobin,
    LeastOutstandingTokens,
    PrefixAware,
}

impl RoutingPolicy {
    pub fn name(self) -> &'static str {
        match self {
            RoutingPolicy::RoundRobin => "round-robin",
            RoutingPolicy::LeastOutstandingTokens => "least-outstanding-tokens",
            RoutingPolicy::PrefixAware => "prefix-aware",
        }
    }
}

/// Picks a replica for each request and keeps the load figures it picks by.
pub struct Router {
    policy: RoutingPolicy,
    next: usize,
    /// Tokens each replica still has to compute for the requests it holds.
    outstanding: Vec<usize>,
    /// Where each prefix group went last.
    sticky: HashMap<u64, usize>,
}

impl Router {
    /// A router over `replicas` (at least one).
    pub fn new(policy: RoutingPolicy, replicas: usize) -> Self {
        assert!(replicas > 0, "a router needs a replica");
        Self {
            policy,
            next: 0,
            outstanding: vec![0; replicas],
            sticky: HashMap::new(),
        }
    }

    /// The replica `spec` goes to; its tokens count as outstanding there from now.
    pub fn route(&mut self, spec: &RequestSpec) -> usize {
        let replica = match self.policy {
            RoutingPolicy::RoundRobin => {
                let r = self.next;
                self.next = (self.next + 1) % self.outstanding.len();
                r
            }
            RoutingPolicy::LeastOutstandingTokens => self.least_loaded(),
            RoutingPolicy::PrefixAware => {
                let least = self.least_loaded();
                match spec.prefix_group.and_then(|g| self.sticky.get(&g)) {
                    Some(&r) if !self.overloaded(r, least) => r,
                    _ => least,
                }
            }
        };
        if let Some(group) = spec.prefix_group {
            self.sticky.insert(group, replica);
        }
        self.outstanding[replica] += spec.prompt_len + spec.output_len;
        replica
    }

    /// `tokens` of work done (computed or given up) on `replica`.
    pub fn done(&mut self, replica: usize, tokens: usize) {
        let left = &mut self.outstanding[replica];
        *left = left.saturating_sub(tokens);
    }

    /// The replica with the fewest outstanding tokens, the first of equals.
    fn least_loaded(&self) -> usize {
        (0..self.outstanding.len())
            .min_by_key(|&r| self.outstanding[r])
            .expect("at least one replica")
    }

    fn overloaded(&self, replica: usize, least: usize) -> bool {
        let (load, min) = (self.outstanding[replica], self.outstanding[least]);
        load as f64 > BALANCE_RELATIVE * min as f64 && load > min + BALANCE_ABSOLUTE_TOKENS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(group: Option<u64>, prompt_len: usize) -> RequestSpec {
        RequestSpec {
            arrival_s: 0.0,
            prompt_len,
            output_len: 0,
            prefix_group: group,
            prefix_len: if group.is_some() { prompt_len } else { 0 },
        }
    }

    #[test]
    fn round_robin_cycles_whatever_the_load() {
        let mut router = Router::new(RoutingPolicy::RoundRobin, 3);
        let picks: Vec<usize> = (0..7).map(|_| router.route(&spec(Some(1), 100))).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn least_outstanding_tokens_fills_the_emptiest_and_sees_work_done() {
        let mut router = Router::new(RoutingPolicy::LeastOutstandingTokens, 2);
        assert_eq!(router.route(&spec(None, 1000)), 0);
        assert_eq!(router.route(&spec(None, 10)), 1);
        assert_eq!(router.route(&spec(None, 10)), 1);
        router.done(0, 1000);
        assert_eq!(router.route(&spec(None, 10)), 0);
    }

    #[test]
    fn prefix_aware_sticks_to_a_group_until_its_replica_is_overloaded() {
        let mut router = Router::new(RoutingPolicy::PrefixAware, 2);
        assert_eq!(router.route(&spec(Some(7), 1000)), 0);
        assert_eq!(router.route(&spec(Some(8), 1000)), 1);
        // Group 7 stays on replica 0 while the imbalance is small.
        for _ in 0..5 {
            assert_eq!(router.route(&spec(Some(7), 1000)), 0);
        }
        // 6,000 vs 1,000 tokens: over both thresholds, so the group moves and sticks there.
        assert_eq!(router.route(&spec(Some(7), 1000)), 1);
        assert_eq!(router.sticky[&7], 1);
        // No group: least loaded.
        router.done(0, 6000);
        assert_eq!(router.route(&spec(None, 10)), 0);
    }
}
