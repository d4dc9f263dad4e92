//! domsnap's criterion benchmarks live in `benches/` (`cargo bench -p benches`); this library
//! is empty.
