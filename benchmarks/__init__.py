"""Benchmarks of vq4dit (not installed with the library): run from the repository root as
`python -m benchmarks.<script> ...`. Each script prints a table and writes a CSV; the CSVs the
docs cite are in benchmarks/results/. See docs/benchmarks.md and docs/scale.md."""
