//! Fairness across tenants: weighted fair queuing as an order on the scheduler's waiting queue.
//!
//! Start-time fair queuing (Goyal, Vin and Cheng, 1996), with tokens as the work unit. When a
//! request arrives it gets a *virtual start tag*
//!
//! ```text
//! S = max(V, F[tenant])        F[tenant] = S + expected_tokens / weight
//! ```
//!
//! where `expected_tokens` is what the request may cost (its prompt plus `n` times its
//! `max_tokens`), `weight` its tenant's share, and `V` the *virtual time*: the start tag of the
//! request to be admitted next (the head of the waiting queue) or, when nothing waits, the
//! largest tag handed out so far (everything before it was admitted). The waiting queue is
//! kept in start-tag order ([`crate::scheduler::SchedulingPolicy::FairShare`]).
//!
//! What that gives: a tenant that sends 64 requests at once gets 64 increasing tags, spaced by
//! their cost over its weight; a request of another tenant arriving meanwhile gets a tag near
//! `V` and is placed ahead of all but the first few of them, so one tenant's burst delays the
//! others by about one request, not by the whole burst. While several tenants have work
//! waiting, admissions go to them in proportion to their weights (in tokens, not requests: a
//! tenant of long requests gets fewer of them). An idle tenant banks no credit (the `max` with
//! `V`): coming back, it starts level with the others, not ahead of them.
//!
//! The tags order *admission*; the batch's seats are shared too. Without that, a tenant that
//! fills every seat first keeps them all until its requests finish, and another tenant's
//! request, however early its tag, waits for a seat to free: a whole decode. So when the queue
//! is blocked, a waiting request whose tenant holds less than its weighted share of
//! `max_num_seqs` takes a seat from the tenant furthest above its own share, preempting that
//! tenant's newest running sequence ([`SeatShares`]; the scheduler's `preempt_for_fair_share`).
//! Both sides are checked *after* the move (the taker still at or below its share, the giver
//! still at or above), so a seat never moves back and forth. Requests without a tenant share
//! one anonymous tenant of weight 1, so with no tenants configured the order is first come,
//! first served and nothing is preempted for fairness.

use std::collections::HashMap;
use std::sync::Arc;

/// A tenant and its weight, as a request carries them into the engine.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TenantShare {
    pub tenant: Arc<str>,
    /// Relative share of admissions while tenants compete; at least 1.
    pub weight: u32,
}

/// What one waiting sequence claims of its tenant's share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FairClaim {
    pub share: TenantShare,
    /// Tokens the request may cost: prompt plus `n` times `max_tokens`.
    pub expected_tokens: u64,
}

/// Virtual time per token of a weight-1 tenant: the tags are integers, and a weight of up to
/// this many still advances a tenant's tag by at least one per token.
const VIRTUAL_TICKS_PER_TOKEN: u64 = 1 << 16;

/// Tenants remembered before those that are caught up with the virtual time are forgotten
/// (forgetting them changes no tag: their finish tag is at most `V`).
const TENANTS_BEFORE_PRUNING: usize = 1024;

/// The virtual clock of the fair queue: each tenant's finish tag.
#[derive(Debug, Default)]
pub struct FairQueue {
    finish: HashMap<Arc<str>, u64>,
    /// The largest start tag handed out: the virtual time once the queue is empty.
    high_water: u64,
}

impl FairQueue {
    /// The start tag of a request arriving now; `head` is the start tag of the request at the
    /// head of the waiting queue, if any. `None` for `claim` is the anonymous tenant.
    pub fn start_tag(&mut self, claim: Option<&FairClaim>, head: Option<u64>) -> u64 {
        let virtual_time = head.unwrap_or(self.high_water);
        let (tenant, weight) = tenant_of(claim);
        let cost = claim.map_or(1, |c| c.expected_tokens);
        if self.finish.len() >= TENANTS_BEFORE_PRUNING {
            self.finish.retain(|_, finish| *finish > virtual_time);
        }
        let finish = self.finish.entry(tenant).or_default();
        let start = virtual_time.max(*finish);
        let step = cost.max(1).saturating_mul(VIRTUAL_TICKS_PER_TOKEN) / weight;
        *finish = start.saturating_add(step.max(1));
        self.high_water = self.high_water.max(start);
        start
    }
}

/// Running seats per tenant against each tenant's weighted share of the batch, for the
/// tenants that have work (running or waiting).
#[derive(Debug, Default)]
pub struct SeatShares {
    /// Per tenant: weight and seats held.
    tenants: HashMap<Arc<str>, (u64, u64)>,
    total_weight: u64,
    max_seats: u64,
}

impl SeatShares {
    pub fn new(max_seats: usize) -> Self {
        Self {
            max_seats: max_seats as u64,
            ..Self::default()
        }
    }

    /// Counts `seats` held by the tenant of `claim` (0 for a tenant that only waits).
    pub fn add(&mut self, claim: Option<&FairClaim>, seats: usize) {
        let (tenant, weight) = tenant_of(claim);
        let entry = self.tenants.entry(tenant).or_insert_with(|| {
            self.total_weight += weight;
            (weight, 0)
        });
        entry.1 += seats as u64;
    }

    /// Seats above (positive) or below its share the tenant holds, in units of
    /// `1 / total_weight` seats so that the comparison stays in integers.
    fn excess(&self, tenant: &str, seats_after: i64) -> Option<i64> {
        let &(weight, _) = self.tenants.get(tenant)?;
        Some(seats_after * self.total_weight as i64 - (self.max_seats * weight) as i64)
    }

    /// Whether the tenant of `claim` may take `group` more seats and still hold no more than
    /// its share.
    pub fn may_take(&self, claim: Option<&FairClaim>, group: usize) -> bool {
        let (tenant, _) = tenant_of(claim);
        let held = self.tenants.get(&tenant).map_or(0, |t| t.1) as i64;
        self.excess(&tenant, held + group as i64)
            .is_some_and(|excess| excess <= 0)
    }

    /// The tenant furthest above its share that would still hold at least its share after
    /// giving up `group` seats: the one to take a seat from. `None`: nobody has seats to spare.
    pub fn giver(&self, group: usize) -> Option<Arc<str>> {
        self.tenants
            .iter()
            .filter_map(|(tenant, &(_, held))| {
                let after = self.excess(tenant, held as i64 - group as i64)?;
                (after >= 0).then_some((after, tenant))
            })
            .max_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(a.1)))
            .map(|(_, tenant)| tenant.clone())
    }

    /// Moves `seats` from tenant `from` to the tenant of `to`.
    pub fn move_seats(&mut self, from: &str, to: Option<&FairClaim>, seats: usize) {
        if let Some(t) = self.tenants.get_mut(from) {
            t.1 = t.1.saturating_sub(seats as u64);
        }
        self.add(to, seats);
    }
}

/// The tenant name and weight a claim stands for; `None` is the anonymous tenant.
pub fn tenant_of(claim: Option<&FairClaim>) -> (Arc<str>, u64) {
    match claim {
        Some(c) => (c.share.tenant.clone(), u64::from(c.share.weight.max(1))),
        None => (Arc::from(""), 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(tenant: &str, weight: u32, tokens: u64) -> FairClaim {
        FairClaim {
            share: TenantShare {
                tenant: tenant.into(),
                weight,
            },
            expected_tokens: tokens,
        }
    }

    /// Tags handed out one by one, each with the smallest waiting tag as `head` (the
    /// scheduler's waiting queue, nothing admitted meanwhile).
    fn tags(queue: &mut FairQueue, claims: &[FairClaim]) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::new();
        for c in claims {
            let head = out.iter().copied().min();
            out.push(queue.start_tag(Some(c), head));
        }
        out
    }

    #[test]
    fn one_tenant_is_served_in_arrival_order() {
        let mut queue = FairQueue::default();
        let t = tags(&mut queue, &vec![claim("a", 1, 100); 5]);
        assert!(t.windows(2).all(|w| w[0] < w[1]), "{t:?}");
    }

    #[test]
    fn a_quiet_tenant_goes_ahead_of_a_burst() {
        let mut queue = FairQueue::default();
        let mut claims = vec![claim("flood", 1, 200); 64];
        claims.push(claim("quiet", 1, 200));
        let t = tags(&mut queue, &claims);
        let quiet = t[64];
        let ahead = t[..64].iter().filter(|&&f| f <= quiet).count();
        assert_eq!(ahead, 1, "only the flood's first request goes first: {t:?}");
    }

    #[test]
    fn competing_tenants_are_admitted_in_proportion_to_their_weights() {
        let mut queue = FairQueue::default();
        let mut claims = Vec::new();
        for _ in 0..30 {
            claims.push(claim("heavy", 3, 100));
            claims.push(claim("light", 1, 100));
        }
        let t = tags(&mut queue, &claims);
        let mut order: Vec<(u64, &str)> = t
            .iter()
            .zip(&claims)
            .map(|(&tag, c)| (tag, &*c.share.tenant))
            .collect();
        order.sort();
        let first_20: Vec<&str> = order[..20].iter().map(|o| o.1).collect();
        let heavy = first_20.iter().filter(|&&n| n == "heavy").count();
        assert!(
            (14..=16).contains(&heavy),
            "3:1 of the first 20: {first_20:?}"
        );
    }

    #[test]
    fn an_idle_tenant_banks_no_credit() {
        let mut queue = FairQueue::default();
        // "a" is served alone for a while: the virtual time moves on.
        let mut last = 0;
        for _ in 0..10 {
            last = queue.start_tag(Some(&claim("a", 1, 100)), None);
        }
        let b = queue.start_tag(Some(&claim("b", 1, 100)), None);
        assert!(b >= last, "b starts level with the virtual time, not at 0");
    }

    #[test]
    fn cheaper_requests_advance_a_tenant_less() {
        let mut queue = FairQueue::default();
        let a1 = queue.start_tag(Some(&claim("a", 1, 10)), Some(0));
        let a2 = queue.start_tag(Some(&claim("a", 1, 10)), Some(0));
        let b1 = queue.start_tag(Some(&claim("b", 1, 1000)), Some(0));
        let b2 = queue.start_tag(Some(&claim("b", 1, 1000)), Some(0));
        assert_eq!(a2 - a1, 10 * VIRTUAL_TICKS_PER_TOKEN);
        assert_eq!(b2 - b1, 1000 * VIRTUAL_TICKS_PER_TOKEN);
    }

    #[test]
    fn tenants_caught_up_with_the_virtual_time_are_forgotten() {
        let mut queue = FairQueue::default();
        let tick = 2 * VIRTUAL_TICKS_PER_TOKEN;
        // "busy" is far ahead of the virtual time: it must be remembered.
        let busy = queue.start_tag(Some(&claim("busy", 1, 1_000_000)), Some(0));
        for i in 0..TENANTS_BEFORE_PRUNING as u64 + 10 {
            let head = Some(i * tick);
            queue.start_tag(Some(&claim(&format!("t{i}"), 1, 1)), head);
        }
        assert!(queue.finish.len() < 20, "{} remembered", queue.finish.len());
        let again = queue.start_tag(Some(&claim("busy", 1, 1)), Some(0));
        assert_eq!(again, busy + 1_000_000 * VIRTUAL_TICKS_PER_TOKEN);
    }

    #[test]
    fn seats_move_from_the_tenant_above_its_share_and_never_back() {
        let mut shares = SeatShares::new(4);
        let flood = claim("flood", 1, 100);
        let quiet = claim("quiet", 1, 100);
        shares.add(Some(&flood), 4);
        shares.add(Some(&quiet), 0);
        // Equal weights, four seats: two each.
        for _ in 0..2 {
            assert!(shares.may_take(Some(&quiet), 1));
            assert_eq!(shares.giver(1).as_deref(), Some("flood"));
            shares.move_seats("flood", Some(&quiet), 1);
        }
        assert!(
            !shares.may_take(Some(&quiet), 1),
            "a third is beyond its share"
        );
        assert!(
            !shares.may_take(Some(&flood), 1),
            "the flood cannot take one back"
        );
        assert_eq!(shares.giver(1), None, "nobody is above its share");
    }

    #[test]
    fn seat_shares_follow_the_weights() {
        let mut shares = SeatShares::new(8);
        let gold = claim("gold", 3, 100);
        let bronze = claim("bronze", 1, 100);
        shares.add(Some(&gold), 0);
        shares.add(Some(&bronze), 8);
        // Gold's share is 6 of 8 seats, bronze's 2.
        for _ in 0..6 {
            assert!(shares.may_take(Some(&gold), 1));
            assert_eq!(shares.giver(1).as_deref(), Some("bronze"));
            shares.move_seats("bronze", Some(&gold), 1);
        }
        assert!(!shares.may_take(Some(&gold), 1));
        assert_eq!(shares.giver(1), None);
        // A tenant whose whole share is below one seat never preempts for it.
        let mut shares = SeatShares::new(2);
        shares.add(Some(&gold), 2);
        shares.add(Some(&bronze), 0);
        assert!(
            !shares.may_take(Some(&bronze), 1),
            "bronze's share is half a seat"
        );
    }
}
