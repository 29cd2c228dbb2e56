//! Cluster-level simulation: `gpus` GPUs shared by online replicas of one or more models (each
//! scaled with its own diurnal load) and batch jobs that each need `k` GPUs for a while, under
//! a cluster scheduler with priority classes, preemption and EASY backfilling.
//!
//! Fidelity is bought where it is affordable: the cluster advances in ticks (a minute by
//! default) and treats a replica as a server of known capacity: the request rate at which
//! one replica still meets the SLO, measured by stepping the real engine on the engine-level
//! simulator ([`replica_capacity`]). The test `replica_capacity_is_the_engine_simulators_knee`
//! checks that level against the one below: at the capacity the engine simulation meets the
//! SLO, well above it does not.
//!
//! Jobs, in order of their class (online replicas first, model by model in the order given,
//! then batch jobs by priority, then arrival):
//! - `Fcfs`: the head job starts when enough GPUs are free; nothing jumps it.
//! - EASY backfill: the head job gets a reservation at the earliest time enough GPUs free
//!   up (from the running jobs' ends); a later job starts now if it fits the free GPUs and
//!   either ends by then or uses only GPUs the head will not need ([`easy_backfill`]).
//! - Preemption: online replicas the load calls for take GPUs from running batch jobs
//!   (lowest priority, most recently started first); a preempted job loses the work since its
//!   last checkpoint, pays a restart cost and returns to the queue.

use minserve_core::{CacheGeometry, EngineConfig};
use serde::Serialize;

use crate::cost::CostProfile;
use crate::engine::{simulate, Load, SimConfig, SimError};
use crate::stats::Slo;
use crate::workload::{synthesize, Arrivals, Lengths};

/// A batch job: `gpus` GPUs for `duration_s` of work.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct JobSpec {
    pub arrival_s: f64,
    pub gpus: usize,
    pub duration_s: f64,
    /// Lower runs first among batch jobs.
    pub priority: i32,
}

/// One online model's traffic: requests per second over the day, and what one replica is.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OnlineLoad {
    /// The model, as reports name it.
    pub name: String,
    /// Mean rate; the rate swings by `amplitude` (a fraction of the mean) over a day, lowest at
    /// `trough_hour`.
    pub mean_rate: f64,
    pub amplitude: f64,
    pub trough_hour: f64,
    /// GPUs per replica (tensor parallelism).
    pub gpus_per_replica: usize,
    /// What one replica serves within the SLO ([`replica_capacity`]).
    pub replica: ReplicaModel,
    /// Seconds from placing a replica to serving (loading weights, warm-up).
    pub startup_s: f64,
    /// Replicas are sized so that each runs at this fraction of its capacity at most.
    pub target_utilization: f64,
    /// A flash crowd on top of the daily curve.
    pub burst: Option<Burst>,
}

/// The online rate multiplied by `multiplier` from `start_s` for `duration_s`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Burst {
    pub start_s: f64,
    pub duration_s: f64,
    pub multiplier: f64,
}

impl OnlineLoad {
    pub fn rate_at(&self, t: f64) -> f64 {
        let hours = t / 3600.0;
        let phase = std::f64::consts::TAU * (hours - self.trough_hour) / 24.0;
        let burst = self
            .burst
            .filter(|b| (b.start_s..b.start_s + b.duration_s).contains(&t))
            .map_or(1.0, |b| b.multiplier);
        (self.mean_rate * (1.0 - self.amplitude * phase.cos())).max(0.0) * burst
    }

    /// Replicas the load at `t` calls for.
    pub fn replicas_for(&self, t: f64) -> usize {
        (self.rate_at(t) / (self.replica.capacity * self.target_utilization)).ceil() as usize
    }
}

/// One replica as the cluster sees it: the rate it serves within the SLO, and the share of
/// requests within the SLO when offered more, measured at a few overloads on the engine-level
/// simulator (a queue that grows misses more than the rate ratio alone says).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplicaModel {
    /// Requests per second with the SLO attainment asked for.
    pub capacity: f64,
    /// `(offered rate / capacity, share within the SLO)`, ratios above 1, ascending.
    pub overload: Vec<(f64, f64)>,
}

impl ReplicaModel {
    /// Share of requests within the SLO when `rate` is spread over replicas of total
    /// `capacity`: 1 up to it, the measured curve above it (interpolated; beyond its last
    /// point, falling as the rate ratio).
    pub fn attainment(&self, rate: f64, capacity: f64) -> f64 {
        if rate <= capacity {
            return 1.0;
        }
        if capacity <= 0.0 {
            return 0.0;
        }
        let ratio = rate / capacity;
        let mut previous = (1.0, 1.0);
        for &(r, a) in &self.overload {
            if ratio <= r {
                let w = (ratio - previous.0) / (r - previous.0);
                return (previous.1 + w * (a - previous.1)).clamp(0.0, 1.0);
            }
            previous = (r, a);
        }
        (previous.1 * previous.0 / ratio).clamp(0.0, 1.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Strict first-come-first-served for batch jobs; online preempts batch.
    FcfsPreempt,
    /// EASY backfill; online waits for free GPUs (no preemption).
    BackfillNoPreempt,
    /// EASY backfill; online preempts batch.
    BackfillPreempt,
}

impl Policy {
    pub const ALL: [Policy; 3] = [
        Policy::BackfillPreempt,
        Policy::FcfsPreempt,
        Policy::BackfillNoPreempt,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Policy::FcfsPreempt => "fcfs-preempt",
            Policy::BackfillNoPreempt => "backfill-no-preempt",
            Policy::BackfillPreempt => "backfill-preempt",
        }
    }

    fn backfills(self) -> bool {
        !matches!(self, Policy::FcfsPreempt)
    }

    fn preempts(self) -> bool {
        !matches!(self, Policy::BackfillNoPreempt)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ClusterConfig {
    pub gpus: usize,
    pub tick_s: f64,
    pub duration_s: f64,
    pub policy: Policy,
    /// A batch job writes a checkpoint this often; preemption loses the work since the last.
    pub checkpoint_interval_s: f64,
    /// Seconds a preempted job spends reloading before it computes again.
    pub restart_cost_s: f64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ClusterError {
    #[error("job {index} needs {gpus} GPUs; the cluster has {cluster}")]
    JobTooLarge {
        index: usize,
        gpus: usize,
        cluster: usize,
    },
    #[error("job {index}: `{field}` is {value}; it must be positive")]
    BadJob {
        index: usize,
        field: &'static str,
        value: f64,
    },
    #[error("two online models are named {0:?}")]
    DuplicateModel(String),
    #[error("online model {model:?}: `{field}` is {value}; {rule}")]
    BadModel {
        model: String,
        field: &'static str,
        value: f64,
        rule: &'static str,
    },
    #[error("`{field}` is {value}; {rule}")]
    BadConfig {
        field: &'static str,
        value: f64,
        rule: &'static str,
    },
}

/// A job while the simulation runs.
#[derive(Debug, Clone)]
struct JobState {
    spec: JobSpec,
    /// Work done and kept (checkpointed or, at the end, finished), seconds.
    kept_s: f64,
    /// When the current run started and the work it had kept then; `None` while queued.
    running_since: Option<f64>,
    /// Restart time still to pay before computing.
    restart_left_s: f64,
    /// Work since the last checkpoint in the current run.
    unsaved_s: f64,
    finished_at: Option<f64>,
    first_start: Option<f64>,
    preemptions: usize,
    /// Times waited in the queue, summed over its waits.
    waited_s: f64,
    queued_since: f64,
}

impl JobState {
    fn remaining_s(&self) -> f64 {
        self.spec.duration_s - self.kept_s - self.unsaved_s + self.restart_left_s
    }
}

/// One tick's state, for the chart and the properties.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TickRecord {
    pub t: f64,
    pub online_rate: f64,
    pub replicas_wanted: usize,
    pub replicas_serving: usize,
    pub replicas_starting: usize,
    pub batch_gpus: usize,
    pub busy_gpus: usize,
    /// Busy GPUs over all GPUs.
    pub utilization: f64,
    /// Fraction of this tick's online requests served within the SLO.
    pub slo_attainment: f64,
    pub queued_jobs: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterReport {
    pub policy: Policy,
    pub gpus: usize,
    pub duration_s: f64,
    /// Busy GPU-seconds over all GPU-seconds.
    pub utilization: f64,
    /// The share of all GPU-seconds that did work that counts: online replicas in proportion
    /// to the load they served, batch jobs' work that was not lost to preemption.
    pub useful_utilization: f64,
    /// Online requests within the SLO over all online requests.
    pub slo_attainment: f64,
    /// The lowest hourly SLO attainment of the day.
    pub worst_hour_slo_attainment: f64,
    pub jobs_submitted: usize,
    pub jobs_finished: usize,
    pub job_wait_mean_s: f64,
    pub job_wait_p90_s: f64,
    pub preemptions: usize,
    /// GPU-seconds of batch work lost to preemption, and spent restarting.
    pub lost_gpu_s: f64,
    pub restart_gpu_s: f64,
    pub batch_useful_gpu_s: f64,
    /// GPU-seconds held by batch jobs after their work ended within their last tick.
    pub batch_held_idle_gpu_s: f64,
    pub online_gpu_s: f64,
    /// Each online model's figures, in the order given.
    pub models: Vec<ModelReport>,
    pub ticks: Vec<TickRecord>,
    /// When each job (in input order) first started.
    #[serde(skip)]
    pub job_first_starts: Vec<Option<f64>>,
    /// `(job, shadow time)` of the first EASY reservation each head job got.
    #[serde(skip)]
    pub head_reservations: Vec<(usize, f64)>,
}

/// One online model over the run.
#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    pub name: String,
    /// Its requests within the SLO over all its requests.
    pub slo_attainment: f64,
    pub worst_hour_slo_attainment: f64,
    pub peak_replicas: usize,
    pub online_gpu_s: f64,
}

/// Where a backfill may go: the head job's reservation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reservation {
    /// When enough GPUs will be free for the head job.
    pub shadow_time: f64,
    /// GPUs free at that time beyond what the head needs: a job running past the shadow
    /// time may use at most these.
    pub extra_gpus: usize,
}

/// EASY's reservation for a head job needing `need` GPUs when `free` are free now and
/// `ends` lists `(end time, gpus)` of the running jobs. `None` if it never fits.
pub fn easy_reservation(
    need: usize,
    free: usize,
    now: f64,
    ends: &mut [(f64, usize)],
) -> Option<Reservation> {
    if need <= free {
        return Some(Reservation {
            shadow_time: now,
            extra_gpus: free - need,
        });
    }
    ends.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut available = free;
    for &(end, gpus) in ends.iter() {
        available += gpus;
        if available >= need {
            return Some(Reservation {
                shadow_time: end,
                extra_gpus: available - need,
            });
        }
    }
    None
}

/// Whether a job of `gpus` GPUs that would run until `end` may start now without delaying
/// the reservation; takes from the reservation's extra GPUs when it runs past the shadow time.
pub fn easy_backfill(reservation: &mut Reservation, gpus: usize, end: f64) -> bool {
    if end <= reservation.shadow_time {
        return true;
    }
    if gpus <= reservation.extra_gpus {
        reservation.extra_gpus -= gpus;
        return true;
    }
    false
}

/// Runs the day.
pub fn simulate_cluster(
    config: &ClusterConfig,
    online: &[OnlineLoad],
    jobs: &[JobSpec],
) -> Result<ClusterReport, ClusterError> {
    check(config, online, jobs)?;
    let mut states: Vec<JobState> = jobs
        .iter()
        .map(|&spec| JobState {
            spec,
            kept_s: 0.0,
            running_since: None,
            restart_left_s: 0.0,
            unsaved_s: 0.0,
            finished_at: None,
            first_start: None,
            preemptions: 0,
            waited_s: 0.0,
            queued_since: spec.arrival_s,
        })
        .collect();
    // Each model's replicas: the time each started (serving once `startup_s` has passed). The
    // day starts with the replicas each model's first minutes need already serving.
    let mut replicas: Vec<Vec<f64>> = Vec::with_capacity(online.len());
    let mut warm_gpus = 0;
    for model in online {
        let warm = model
            .replicas_for(model.startup_s)
            .min((config.gpus - warm_gpus) / model.gpus_per_replica);
        warm_gpus += warm * model.gpus_per_replica;
        replicas.push(vec![-model.startup_s; warm]);
    }
    let online_gpus = |replicas: &[Vec<f64>]| -> usize {
        replicas
            .iter()
            .zip(online)
            .map(|(r, model)| r.len() * model.gpus_per_replica)
            .sum()
    };
    // Per model: requests, requests within the SLO, GPU-seconds, most replicas, and each
    // tick's `(rate, attainment)` for its worst hour.
    let mut model_requests = vec![0.0; online.len()];
    let mut model_in_slo = vec![0.0; online.len()];
    let mut model_gpu_s = vec![0.0; online.len()];
    let mut model_peak = vec![0usize; online.len()];
    let mut model_ticks: Vec<Vec<(f64, f64)>> = vec![Vec::new(); online.len()];
    let mut ticks = Vec::new();
    let (mut busy_gpu_s, mut online_gpu_s, mut online_useful_gpu_s) = (0.0, 0.0, 0.0);
    let (mut lost_gpu_s, mut restart_gpu_s, mut held_idle_gpu_s) = (0.0, 0.0, 0.0);
    let (mut requests, mut requests_in_slo) = (0.0, 0.0);
    let mut preemptions = 0;
    let mut head_reservations: Vec<(usize, f64)> = Vec::new();
    let dt = config.tick_s;
    let mut t = 0.0;
    while t < config.duration_s - 1e-9 {
        // 1. Online replicas: scale each model to its load at the end of its startup delay,
        // all scale-downs first so that the GPUs they free are there for the scale-ups.
        let wanted: Vec<usize> = online
            .iter()
            .map(|model| model.replicas_for(t + model.startup_s))
            .collect();
        for (own, &wanted) in replicas.iter_mut().zip(&wanted) {
            if own.len() > wanted {
                // Starting ones go first, then the newest serving ones.
                own.sort_by(|a, b| b.total_cmp(a));
                own.drain(..own.len() - wanted);
            }
        }
        let batch_gpus = |states: &[JobState]| -> usize {
            states
                .iter()
                .filter(|s| s.running_since.is_some())
                .map(|s| s.spec.gpus)
                .sum()
        };
        for (m, model) in online.iter().enumerate() {
            while replicas[m].len() < wanted[m] {
                let free = config.gpus - online_gpus(&replicas) - batch_gpus(&states);
                if free >= model.gpus_per_replica {
                    replicas[m].push(t);
                    continue;
                }
                if !config.policy.preempts() {
                    break;
                }
                // The batch job that started last loses least; lowest priority goes first.
                let victim = states
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.running_since.is_some())
                    .max_by(|a, b| {
                        (a.1.spec.priority, a.1.running_since.unwrap_or(0.0))
                            .partial_cmp(&(b.1.spec.priority, b.1.running_since.unwrap_or(0.0)))
                            .unwrap_or(std::cmp::Ordering::Equal)
                    })
                    .map(|(i, _)| i);
                let Some(victim) = victim else { break };
                let s = &mut states[victim];
                lost_gpu_s += s.unsaved_s * s.spec.gpus as f64;
                s.unsaved_s = 0.0;
                s.running_since = None;
                s.restart_left_s = config.restart_cost_s;
                s.preemptions += 1;
                s.queued_since = t;
                preemptions += 1;
            }
        }
        // 2. Batch jobs: start what the policy allows.
        let mut free = config.gpus - online_gpus(&replicas) - batch_gpus(&states);
        let mut queue: Vec<usize> = (0..states.len())
            .filter(|&i| {
                let s = &states[i];
                s.running_since.is_none() && s.finished_at.is_none() && s.spec.arrival_s <= t
            })
            .collect();
        queue.sort_by(|&a, &b| {
            let (x, y) = (&states[a], &states[b]);
            (x.spec.priority, x.spec.arrival_s, a)
                .partial_cmp(&(y.spec.priority, y.spec.arrival_s, b))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let mut reservation: Option<Reservation> = None;
        for &i in &queue {
            let need = states[i].spec.gpus;
            match reservation.as_mut() {
                None if need <= free => {}
                None => {
                    if !config.policy.backfills() {
                        break;
                    }
                    let mut ends: Vec<(f64, usize)> = states
                        .iter()
                        .filter(|s| s.running_since.is_some())
                        .map(|s| (t + s.remaining_s(), s.spec.gpus))
                        .collect();
                    match easy_reservation(need, free, t, &mut ends) {
                        Some(r) => {
                            if !head_reservations.iter().any(|&(j, _)| j == i) {
                                head_reservations.push((i, r.shadow_time));
                            }
                            reservation = Some(r)
                        }
                        None => break,
                    }
                    continue;
                }
                Some(r) => {
                    if need > free || !easy_backfill(r, need, t + states[i].remaining_s()) {
                        continue;
                    }
                }
            }
            let s = &mut states[i];
            s.running_since = Some(t);
            s.first_start.get_or_insert(t);
            s.waited_s += t - s.queued_since;
            free -= need;
        }
        // 3. Advance the tick: work, checkpoints, finishes. A job holds its GPUs for the whole
        // tick it finishes in (they are handed out again at the next tick).
        let batch = batch_gpus(&states);
        for s in states.iter_mut().filter(|s| s.running_since.is_some()) {
            let gpus = s.spec.gpus as f64;
            let mut left = dt;
            let restart = s.restart_left_s.min(left);
            s.restart_left_s -= restart;
            restart_gpu_s += restart * gpus;
            left -= restart;
            let work = left.min(s.spec.duration_s - s.kept_s - s.unsaved_s);
            s.unsaved_s += work;
            busy_gpu_s += dt * gpus;
            held_idle_gpu_s += (dt - restart - work) * gpus;
            if s.kept_s + s.unsaved_s >= s.spec.duration_s - 1e-9 {
                s.kept_s += s.unsaved_s;
                s.unsaved_s = 0.0;
                s.running_since = None;
                s.finished_at = Some(t + restart + work);
            } else {
                let checkpoints = (s.unsaved_s / config.checkpoint_interval_s).floor();
                s.kept_s += checkpoints * config.checkpoint_interval_s;
                s.unsaved_s -= checkpoints * config.checkpoint_interval_s;
            }
        }
        let (mut rate, mut rate_in_slo, mut serving, mut starting) = (0.0, 0.0, 0, 0);
        for (m, model) in online.iter().enumerate() {
            let own = &replicas[m];
            let gpr = model.gpus_per_replica;
            let own_serving = own
                .iter()
                .filter(|&&start| start + model.startup_s <= t)
                .count();
            let own_rate = model.rate_at(t);
            let capacity = own_serving as f64 * model.replica.capacity;
            let attainment = model.replica.attainment(own_rate, capacity);
            model_requests[m] += own_rate * dt;
            model_in_slo[m] += attainment * own_rate * dt;
            model_gpu_s[m] += (own.len() * gpr) as f64 * dt;
            model_peak[m] = model_peak[m].max(own.len());
            model_ticks[m].push((own_rate, attainment));
            online_useful_gpu_s += if capacity > 0.0 {
                (own_rate.min(capacity) / capacity) * (own_serving * gpr) as f64 * dt
            } else {
                0.0
            };
            rate += own_rate;
            rate_in_slo += attainment * own_rate;
            serving += own_serving;
            starting += own.len() - own_serving;
        }
        let attainment = if rate > 0.0 { rate_in_slo / rate } else { 1.0 };
        requests += rate * dt;
        requests_in_slo += rate_in_slo * dt;
        let online_gpus = online_gpus(&replicas);
        online_gpu_s += online_gpus as f64 * dt;
        busy_gpu_s += online_gpus as f64 * dt;
        let busy = online_gpus + batch;
        ticks.push(TickRecord {
            t,
            online_rate: rate,
            replicas_wanted: wanted.iter().sum(),
            replicas_serving: serving,
            replicas_starting: starting,
            batch_gpus: batch,
            busy_gpus: busy,
            utilization: busy as f64 / config.gpus as f64,
            slo_attainment: attainment,
            queued_jobs: states
                .iter()
                .filter(|s| {
                    s.running_since.is_none() && s.finished_at.is_none() && s.spec.arrival_s <= t
                })
                .count(),
        });
        t += dt;
    }
    let total_gpu_s = config.gpus as f64 * config.duration_s;
    let batch_useful: f64 = states
        .iter()
        .map(|s| (s.kept_s + s.unsaved_s) * s.spec.gpus as f64)
        .sum();
    let mut waits: Vec<f64> = states
        .iter()
        .filter(|s| s.spec.arrival_s < config.duration_s)
        .map(|s| {
            s.waited_s
                + if s.running_since.is_none() && s.finished_at.is_none() {
                    config.duration_s - s.queued_since.max(s.spec.arrival_s)
                } else {
                    0.0
                }
        })
        .collect();
    waits.sort_by(f64::total_cmp);
    let ticks_per_hour = (3600.0 / dt).round().max(1.0) as usize;
    let worst_hour = |ticks: &[(f64, f64)]| {
        ticks
            .chunks(ticks_per_hour)
            .map(|hour| {
                let (r, ok) = hour.iter().fold((0.0, 0.0), |(r, ok), &(rate, att)| {
                    (r + rate, ok + rate * att)
                });
                if r > 0.0 {
                    ok / r
                } else {
                    1.0
                }
            })
            .fold(1.0, f64::min)
    };
    let all_ticks: Vec<(f64, f64)> = ticks
        .iter()
        .map(|k| (k.online_rate, k.slo_attainment))
        .collect();
    let models = online
        .iter()
        .enumerate()
        .map(|(m, model)| ModelReport {
            name: model.name.clone(),
            slo_attainment: if model_requests[m] > 0.0 {
                model_in_slo[m] / model_requests[m]
            } else {
                1.0
            },
            worst_hour_slo_attainment: worst_hour(&model_ticks[m]),
            peak_replicas: model_peak[m],
            online_gpu_s: model_gpu_s[m],
        })
        .collect();
    Ok(ClusterReport {
        policy: config.policy,
        gpus: config.gpus,
        duration_s: config.duration_s,
        utilization: busy_gpu_s / total_gpu_s,
        useful_utilization: (online_useful_gpu_s + batch_useful) / total_gpu_s,
        slo_attainment: if requests > 0.0 {
            requests_in_slo / requests
        } else {
            1.0
        },
        worst_hour_slo_attainment: worst_hour(&all_ticks),
        jobs_submitted: waits.len(),
        jobs_finished: states.iter().filter(|s| s.finished_at.is_some()).count(),
        job_wait_mean_s: waits.iter().sum::<f64>() / waits.len().max(1) as f64,
        job_wait_p90_s: crate::stats::percentile(&waits, 90.0).unwrap_or(0.0),
        preemptions,
        lost_gpu_s,
        restart_gpu_s,
        batch_useful_gpu_s: batch_useful,
        batch_held_idle_gpu_s: held_idle_gpu_s,
        online_gpu_s,
        models,
        ticks,
        job_first_starts: states.iter().map(|s| s.first_start).collect(),
        head_reservations,
    })
}

fn check(
    config: &ClusterConfig,
    online: &[OnlineLoad],
    jobs: &[JobSpec],
) -> Result<(), ClusterError> {
    require_positive(&[
        ("gpus", config.gpus as f64),
        ("tick_s", config.tick_s),
        ("duration_s", config.duration_s),
        ("checkpoint_interval_s", config.checkpoint_interval_s),
    ])?;
    require_non_negative(&[("restart_cost_s", config.restart_cost_s)])?;
    for (i, model) in online.iter().enumerate() {
        if online[..i].iter().any(|other| other.name == model.name) {
            return Err(ClusterError::DuplicateModel(model.name.clone()));
        }
        check_model(config, model).map_err(|e| match e {
            ClusterError::BadConfig { field, value, rule } => ClusterError::BadModel {
                model: model.name.clone(),
                field,
                value,
                rule,
            },
            other => other,
        })?;
    }
    check_jobs(config, jobs)
}

fn check_model(config: &ClusterConfig, online: &OnlineLoad) -> Result<(), ClusterError> {
    require_positive(&[
        ("gpus_per_replica", online.gpus_per_replica as f64),
        ("replica.capacity", online.replica.capacity),
        ("target_utilization", online.target_utilization),
    ])?;
    require_non_negative(&[
        ("mean_rate", online.mean_rate),
        ("startup_s", online.startup_s),
    ])?;
    if !(0.0..=1.0).contains(&online.amplitude) {
        return Err(ClusterError::BadConfig {
            field: "amplitude",
            value: online.amplitude,
            rule: "it must be between 0 and 1",
        });
    }
    if online.gpus_per_replica > config.gpus {
        return Err(ClusterError::BadConfig {
            field: "gpus_per_replica",
            value: online.gpus_per_replica as f64,
            rule: "a replica must fit the cluster",
        });
    }
    Ok(())
}

/// The first of `fields` that is not a finite number above 0, as an error.
fn require_positive(fields: &[(&'static str, f64)]) -> Result<(), ClusterError> {
    require(fields, |v| v > 0.0, "it must be positive")
}

/// The first of `fields` that is not a finite number of 0 or more, as an error.
fn require_non_negative(fields: &[(&'static str, f64)]) -> Result<(), ClusterError> {
    require(fields, |v| v >= 0.0, "it must be 0 or more")
}

fn require(
    fields: &[(&'static str, f64)],
    holds: fn(f64) -> bool,
    rule: &'static str,
) -> Result<(), ClusterError> {
    match fields
        .iter()
        .find(|&&(_, value)| !(value.is_finite() && holds(value)))
    {
        Some(&(field, value)) => Err(ClusterError::BadConfig { field, value, rule }),
        None => Ok(()),
    }
}

fn check_jobs(config: &ClusterConfig, jobs: &[JobSpec]) -> Result<(), ClusterError> {
    for (index, job) in jobs.iter().enumerate() {
        if job.gpus == 0 {
            return Err(ClusterError::BadJob {
                index,
                field: "gpus",
                value: 0.0,
            });
        }
        if job.gpus > config.gpus {
            return Err(ClusterError::JobTooLarge {
                index,
                gpus: job.gpus,
                cluster: config.gpus,
            });
        }
        if !(job.duration_s.is_finite() && job.duration_s > 0.0) {
            return Err(ClusterError::BadJob {
                index,
                field: "duration_s",
                value: job.duration_s,
            });
        }
        if !(job.arrival_s.is_finite() && job.arrival_s >= 0.0) {
            return Err(ClusterError::BadJob {
                index,
                field: "arrival_s",
                value: job.arrival_s,
            });
        }
    }
    Ok(())
}

/// How a replica's engine is simulated to size it: the real scheduler under `profile`,
/// `requests` Poisson arrivals of `lengths` per trial.
#[derive(Debug, Clone, Copy)]
pub struct ReplicaTrial<'a> {
    pub profile: &'a CostProfile,
    pub engine: EngineConfig,
    pub block_size: usize,
    pub slo: Slo,
    pub lengths: Lengths,
    pub requests: usize,
    pub seed: u64,
}

/// Overloads at which [`replica_capacity`] measures the share within the SLO.
const OVERLOADS: [f64; 5] = [1.1, 1.25, 1.5, 2.0, 3.0];

impl ReplicaTrial<'_> {
    fn config(&self) -> SimConfig {
        SimConfig {
            engine: self.engine,
            geometry: CacheGeometry {
                block_size: self.block_size,
                num_blocks: self.profile.num_blocks(self.block_size, None),
            },
            cost: self.profile.cost,
            slo: Some(self.slo),
            ingest_s: 0.0,
        }
    }

    /// Share of requests within the SLO at `rate`.
    pub fn attainment(&self, rate: f64) -> Result<f64, SimError> {
        let workload = synthesize(
            self.requests,
            Arrivals::Poisson { rate },
            self.lengths,
            0,
            self.seed,
        );
        let report = simulate(&self.config(), &workload, Load::Open, None)?;
        Ok(report.good_requests.unwrap_or(0) as f64 / self.requests.max(1) as f64)
    }
}

/// The highest request rate one replica serves with at least `attainment` of its requests
/// within the SLO (bisection on the engine-level simulator), and the share within it at a few
/// overloads.
pub fn replica_capacity(trial: &ReplicaTrial, attainment: f64) -> Result<ReplicaModel, SimError> {
    // Above the rate it completes requests at when all arrive at once, nothing holds.
    let all_at_once = synthesize(
        trial.requests,
        Arrivals::AllAtOnce,
        trial.lengths,
        0,
        trial.seed,
    );
    let mut hi = simulate(&trial.config(), &all_at_once, Load::Open, None)?.request_throughput;
    let mut lo = 0.0;
    for _ in 0..14 {
        let mid = 0.5 * (lo + hi);
        if trial.attainment(mid)? >= attainment {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let overload = OVERLOADS
        .iter()
        .map(|&r| Ok((r, trial.attainment(r * lo)?)))
        .collect::<Result<Vec<_>, SimError>>()?;
    Ok(ReplicaModel {
        capacity: lo,
        overload,
    })
}

/// The batch side of a day: jobs of 1 to 64 GPUs (mostly small, a few large) with log-normal
/// run times (median 40 minutes, clamped to 5 minutes .. 12 hours), arriving as a Poisson
/// process whose GPU demand averages `demand` of the cluster, plus a backlog at the start of
/// `backlog_hours` of that demand.
pub fn batch_jobs(
    gpus: usize,
    demand: f64,
    backlog_hours: f64,
    duration_s: f64,
    seed: u64,
) -> Vec<JobSpec> {
    const SIZES: [(usize, f64); 7] = [
        (1, 0.30),
        (2, 0.15),
        (4, 0.15),
        (8, 0.20),
        (16, 0.10),
        (32, 0.07),
        (64, 0.03),
    ];
    let mut rng = minserve_core::sampling::Rng::new(seed ^ 0xC1_u64);
    let draw = |rng: &mut minserve_core::sampling::Rng| {
        let u = rng.next_f64();
        let mut acc = 0.0;
        let mut size = SIZES[SIZES.len() - 1].0;
        for &(g, p) in &SIZES {
            acc += p;
            if u < acc {
                size = g;
                break;
            }
        }
        let normal = {
            let (u1, u2) = (1.0 - rng.next_f64(), rng.next_f64());
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        };
        let duration = (2400.0 * normal.exp()).clamp(300.0, 43_200.0);
        let priority = i32::from(rng.next_f64() < 0.3);
        (size.min(gpus), duration, priority)
    };
    let mean_gpu_s: f64 =
        SIZES.iter().map(|&(g, p)| g as f64 * p).sum::<f64>() * 2400.0 * 0.5f64.exp();
    let rate = demand * gpus as f64 / mean_gpu_s;
    let backlog = (rate * backlog_hours * 3600.0).round() as usize;
    let mut jobs = Vec::new();
    for _ in 0..backlog {
        let (gpus, duration_s, priority) = draw(&mut rng);
        jobs.push(JobSpec {
            arrival_s: 0.0,
            gpus,
            duration_s,
            priority,
        });
    }
    let mut t = 0.0;
    loop {
        t += -(1.0 - rng.next_f64()).ln() / rate;
        if t >= duration_s {
            break;
        }
        let (gpus, duration_s, priority) = draw(&mut rng);
        jobs.push(JobSpec {
            arrival_s: t,
            gpus,
            duration_s,
            priority,
        });
    }
    jobs
}

#[cfg(test)]
mod tests {
    use super::*;
    use minserve_core::scheduler::SchedulerConfig;

    /// The cluster's model of a replica (all requests within the SLO up to its capacity, a
    /// falling share above) against the engine-level simulation it abstracts.
    #[test]
    fn replica_capacity_is_the_engine_simulators_knee() {
        let profile = CostProfile::preset("llama-8b-h100").unwrap();
        let engine = EngineConfig {
            scheduler: SchedulerConfig::default(),
            prefix_caching: true,
            max_model_len: profile.max_model_len,
        };
        let slo = Slo {
            ttft_ms: 1000.0,
            tpot_ms: 50.0,
        };
        let trial = ReplicaTrial {
            profile: &profile,
            engine,
            block_size: 16,
            slo,
            lengths: Lengths::ShareGptLike,
            requests: 1000,
            seed: 5,
        };
        let replica = replica_capacity(&trial, 0.95).unwrap();
        assert!(replica.capacity > 1.0, "{replica:?}");
        // Other arrival draws than the ones that sized it: below the knee every request meets
        // the SLO; above it the cluster's curve says what the engine simulation does.
        let other = ReplicaTrial { seed: 11, ..trial };
        assert!(other.attainment(0.8 * replica.capacity).unwrap() > 0.97);
        for ratio in [1.2, 1.7, 2.5] {
            let engine_level = other.attainment(ratio * replica.capacity).unwrap();
            let cluster_level = replica.attainment(ratio * replica.capacity, replica.capacity);
            assert!(
                (engine_level - cluster_level).abs() < 0.15,
                "{ratio}x: engine {engine_level}, cluster {cluster_level}, {replica:?}"
            );
        }
        assert!(replica.attainment(3.0 * replica.capacity, replica.capacity) < 0.5);
    }
}
