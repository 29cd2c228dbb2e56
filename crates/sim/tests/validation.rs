//! The simulator against the committed measurements of this project's machine
//! (`validation/default-cpu.json`, made by `validation/measure.sh`): every figure within the
//! file's tolerance, or within the tolerance of a stated exception.

use minserve_core::scheduler::SchedulerConfig;
use minserve_core::EngineConfig;
use minserve_sim::cost::CostProfile;
use minserve_sim::validation::{compare, Measurements};

#[test]
fn the_default_cpu_preset_reproduces_the_measured_benchmarks() {
    let measurements: Measurements =
        serde_json::from_str(include_str!("../validation/default-cpu.json")).unwrap();
    let profile = CostProfile::preset(&measurements.profile).unwrap();
    // The CLI's defaults (`serve`, `bench throughput`): what the runs used.
    let engine = EngineConfig {
        scheduler: SchedulerConfig::default(),
        prefix_caching: true,
        max_model_len: profile.max_model_len,
    };
    let comparisons = compare(&measurements, &profile, engine, 16).unwrap();
    assert!(comparisons.len() >= 11, "{comparisons:#?}");
    for scenario in &measurements.scenarios {
        for exception in &scenario.exceptions {
            assert!(
                comparisons
                    .iter()
                    .any(|c| c.scenario == scenario.name && c.figure == exception.figure),
                "{}: an exception for `{}`, which is not compared",
                scenario.name,
                exception.figure
            );
        }
    }
    let outside: Vec<_> = comparisons.iter().filter(|c| !c.within).collect();
    for c in &comparisons {
        println!(
            "{:<36} {:<18} measured {:>9.2} simulated {:>9.2} ({:+.1}%, tolerance {:.0}%)",
            c.scenario,
            c.figure,
            c.measured,
            c.simulated,
            c.error * 100.0,
            c.tolerance * 100.0
        );
    }
    assert!(outside.is_empty(), "{outside:#?}");
}
