//! Shared by the Criterion benches. `cargo bench` runs them with `--bench` and Criterion's own
//! flags. `cargo test --all-targets -- --test-threads=2` runs them too, with libtest flags that
//! Criterion's argument parser rejects; then they run as a short smoke pass instead.

use std::time::Duration;

use criterion::Criterion;

/// True under `cargo bench` (cargo passes `--bench`).
pub fn benchmarking() -> bool {
    std::env::args().any(|arg| arg == "--bench")
}

/// Criterion configured from the command line under `cargo bench`, a quick pass otherwise.
pub fn criterion() -> Criterion {
    if benchmarking() {
        Criterion::default().configure_from_args()
    } else {
        Criterion::default()
            .warm_up_time(Duration::from_millis(10))
            .measurement_time(Duration::from_millis(50))
            .sample_size(10)
    }
}
