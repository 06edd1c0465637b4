//! Benchmarks live in `benches/`; see `cargo bench -p upsplice-benches`.
