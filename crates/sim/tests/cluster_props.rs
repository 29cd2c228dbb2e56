//! Properties of the cluster simulator on random small clusters and job mixes.

use minserve_sim::cluster::{
    easy_backfill, easy_reservation, simulate_cluster, Burst, ClusterConfig, ClusterError, JobSpec,
    OnlineLoad, Policy, ReplicaModel,
};
use proptest::prelude::*;

/// 40 jobs of 4 GPUs for 20 hours, all queued at the start: a cluster full of batch work.
fn long_batch_jobs() -> Vec<JobSpec> {
    (0..40)
        .map(|i| JobSpec {
            arrival_s: 0.0,
            gpus: 4,
            duration_s: 20.0 * 3600.0,
            priority: i % 2,
        })
        .collect()
}

fn online(mean_rate: f64) -> OnlineLoad {
    OnlineLoad {
        name: "model".into(),
        mean_rate,
        amplitude: 0.8,
        trough_hour: 2.0,
        gpus_per_replica: 1,
        replica: ReplicaModel {
            capacity: 1.0,
            overload: vec![(1.5, 0.4), (3.0, 0.1)],
        },
        startup_s: 60.0,
        target_utilization: 0.8,
        burst: Some(Burst {
            start_s: 3600.0,
            duration_s: 1800.0,
            multiplier: 1.5,
        }),
    }
}

fn config(gpus: usize, policy: Policy) -> ClusterConfig {
    ClusterConfig {
        gpus,
        tick_s: 60.0,
        duration_s: 6.0 * 3600.0,
        policy,
        checkpoint_interval_s: 1200.0,
        restart_cost_s: 120.0,
    }
}

fn jobs(gpus: usize) -> impl Strategy<Value = Vec<JobSpec>> {
    prop::collection::vec(
        (0.0..4.0 * 3600.0, 1..=gpus, 300.0..3.0 * 3600.0, 0..2i32),
        1..40,
    )
    .prop_map(|mut v| {
        v.sort_by(|a: &(f64, usize, f64, i32), b| a.0.total_cmp(&b.0));
        v.into_iter()
            .map(|(arrival_s, gpus, duration_s, priority)| JobSpec {
                arrival_s,
                gpus,
                duration_s,
                priority,
            })
            .collect()
    })
}

fn policy() -> impl Strategy<Value = Policy> {
    prop::sample::select(Policy::ALL.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// No tick uses more GPUs than exist, utilization stays within [0, 1], and every GPU-second
    /// batch jobs held is accounted for: work kept (checkpointed or finished), work lost to
    /// preemption, restarting, or the idle end of a job's last tick.
    #[test]
    fn capacity_utilization_and_work_are_accounted(
        gpus in 4usize..40,
        policy in policy(),
        rate in 0.0..30.0f64,
        seed_jobs in jobs(4),
    ) {
        let jobs: Vec<JobSpec> = seed_jobs;
        let report = simulate_cluster(&config(gpus, policy), &[online(rate)], &jobs).unwrap();
        for tick in &report.ticks {
            prop_assert!(tick.busy_gpus <= gpus, "{tick:?}");
            prop_assert!((0.0..=1.0).contains(&tick.utilization));
            prop_assert!((0.0..=1.0).contains(&tick.slo_attainment));
        }
        prop_assert!(report.utilization >= 0.0 && report.utilization <= 1.0 + 1e-9);
        prop_assert!(report.useful_utilization <= report.utilization + 1e-9);
        let batch_busy: f64 = report.ticks.iter().map(|t| t.batch_gpus as f64 * 60.0).sum();
        let accounted = report.batch_useful_gpu_s
            + report.lost_gpu_s
            + report.restart_gpu_s
            + report.batch_held_idle_gpu_s;
        prop_assert!((batch_busy - accounted).abs() <= 1e-6 * batch_busy.max(1.0) + 1e-6,
            "busy {batch_busy} vs accounted {accounted}");
        if policy == Policy::BackfillNoPreempt {
            prop_assert_eq!(report.preemptions, 0);
        }
        let done: f64 = jobs.iter().map(|j| j.duration_s * j.gpus as f64).sum();
        prop_assert!(report.batch_useful_gpu_s <= done + 1e-6);
    }

    /// Without online load and with exact run times, EASY backfilling never delays the job at
    /// the head of the queue: it starts by the shadow time of its reservation.
    #[test]
    fn backfill_never_delays_the_head_job(gpus in 4usize..24, jobs in jobs(4)) {
        // Durations rounded to whole ticks, so that a job's end is known exactly.
        let jobs: Vec<JobSpec> = jobs
            .into_iter()
            .map(|j| JobSpec {
                arrival_s: 0.0,
                duration_s: (j.duration_s / 60.0).ceil() * 60.0,
                priority: 0,
                ..j
            })
            .collect();
        let mut fcfs = config(gpus, Policy::FcfsPreempt);
        let mut easy = config(gpus, Policy::BackfillPreempt);
        fcfs.duration_s = 200.0 * 3600.0;
        easy.duration_s = fcfs.duration_s;
        let strict = simulate_cluster(&fcfs, &[online(0.0)], &jobs).unwrap();
        let backfilled = simulate_cluster(&easy, &[online(0.0)], &jobs).unwrap();
        prop_assert_eq!(strict.jobs_finished, jobs.len());
        prop_assert_eq!(backfilled.jobs_finished, jobs.len());
        // Every head job started by the shadow time of the reservation it first got.
        for &(job, shadow) in &backfilled.head_reservations {
            let start = backfilled.job_first_starts[job].unwrap();
            prop_assert!(start <= shadow + 1e-6, "job {job} started at {start}, reserved {shadow}");
        }
        prop_assert!(!backfilled.head_reservations.is_empty() || jobs.iter().map(|j| j.gpus).sum::<usize>() <= gpus);
    }

    /// The reservation arithmetic: a backfill admitted ends by the shadow time or fits in the
    /// extra GPUs, so the head job still has its GPUs at the shadow time.
    #[test]
    fn a_backfill_keeps_the_reservation(
        need in 1usize..32,
        free in 0usize..32,
        ends in prop::collection::vec((1.0..100.0f64, 1usize..16), 0..8),
        candidates in prop::collection::vec((1usize..16, 0.0..200.0f64), 0..8),
    ) {
        let mut ends = ends;
        let Some(mut reservation) = easy_reservation(need, free, 0.0, &mut ends) else {
            let total: usize = free + ends.iter().map(|e| e.1).sum::<usize>();
            prop_assert!(total < need);
            return Ok(());
        };
        let shadow = reservation.shadow_time;
        let freed_by_shadow: usize = free + ends.iter().filter(|e| e.0 <= shadow).map(|e| e.1).sum::<usize>();
        prop_assert!(freed_by_shadow >= need);
        let mut free_now = free;
        let mut running_past_shadow = 0;
        for (gpus, end) in candidates {
            if gpus <= free_now && easy_backfill(&mut reservation, gpus, end) {
                free_now -= gpus;
                if end > shadow {
                    running_past_shadow += gpus;
                }
            }
        }
        prop_assert!(freed_by_shadow - running_past_shadow >= need);
    }
}

#[test]
fn a_job_larger_than_the_cluster_is_named() {
    let jobs = [
        JobSpec {
            arrival_s: 0.0,
            gpus: 2,
            duration_s: 60.0,
            priority: 0,
        },
        JobSpec {
            arrival_s: 0.0,
            gpus: 9,
            duration_s: 60.0,
            priority: 0,
        },
    ];
    let e =
        simulate_cluster(&config(8, Policy::BackfillPreempt), &[online(1.0)], &jobs).unwrap_err();
    assert_eq!(
        e,
        ClusterError::JobTooLarge {
            index: 1,
            gpus: 9,
            cluster: 8
        }
    );
    assert_eq!(e.to_string(), "job 1 needs 9 GPUs; the cluster has 8");
    let mut bad = config(8, Policy::BackfillPreempt);
    bad.tick_s = 0.0;
    let e = simulate_cluster(&bad, &[online(1.0)], &jobs[..1])
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("`tick_s` is 0"), "{e}");
}

#[test]
fn preemption_keeps_online_slos_that_waiting_for_free_gpus_misses() {
    // A cluster full of long batch jobs; online load rises through the day.
    let jobs = long_batch_jobs();
    let mut c = config(64, Policy::BackfillPreempt);
    c.duration_s = 24.0 * 3600.0;
    let load = [online(20.0)];
    let preempt = simulate_cluster(&c, &load, &jobs).unwrap();
    c.policy = Policy::BackfillNoPreempt;
    let wait = simulate_cluster(&c, &load, &jobs).unwrap();
    assert!(preempt.slo_attainment > 0.98, "{}", preempt.slo_attainment);
    assert!(
        wait.slo_attainment < preempt.slo_attainment - 0.05,
        "{} vs {}",
        wait.slo_attainment,
        preempt.slo_attainment
    );
    assert!(preempt.preemptions > 0 && preempt.lost_gpu_s > 0.0);
    assert_eq!(wait.preemptions, 0);
}

#[test]
fn two_models_with_peaks_apart_share_the_cluster_and_each_keeps_its_slo() {
    let jobs = long_batch_jobs();
    let mut c = config(64, Policy::BackfillPreempt);
    c.duration_s = 24.0 * 3600.0;
    let mut day = online(10.0);
    day.name = "day".into();
    let mut night = online(10.0);
    night.name = "night".into();
    night.trough_hour = day.trough_hour + 12.0;
    night.burst = None;
    let r = simulate_cluster(&c, &[day.clone(), night.clone()], &jobs).unwrap();
    assert_eq!(r.models.len(), 2);
    for m in &r.models {
        assert!(m.slo_attainment > 0.98, "{}: {}", m.name, m.slo_attainment);
    }
    let per_model: f64 = r.models.iter().map(|m| m.online_gpu_s).sum();
    assert!((per_model - r.online_gpu_s).abs() < 1e-6);
    assert!(r.ticks.iter().all(|k| k.busy_gpus <= 64));
    // Peaks twelve hours apart: the two models together never need what their two peaks add
    // up to, and the GPUs one gives back at its trough go to the other or to batch jobs.
    let together = r
        .ticks
        .iter()
        .map(|k| k.replicas_serving + k.replicas_starting)
        .max()
        .unwrap();
    let apart = r.models[0].peak_replicas + r.models[1].peak_replicas;
    assert!(together * 4 < apart * 3, "{together} vs {apart}");
    // Alone, each model's SLO holds too, and batch jobs get less with both.
    let alone = simulate_cluster(&c, &[day.clone()], &jobs).unwrap();
    assert!(alone.batch_useful_gpu_s > r.batch_useful_gpu_s);

    let e = simulate_cluster(&c, &[day.clone(), day], &jobs).unwrap_err();
    assert_eq!(e, ClusterError::DuplicateModel("day".into()));
    let mut broken = night;
    broken.target_utilization = 0.0;
    let e = simulate_cluster(&c, &[broken], &jobs).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("online model \"night\": `target_utilization`"),
        "{e}"
    );
}
