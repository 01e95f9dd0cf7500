"""`ragtop bench ...`: micro-benchmarks (operators) measured on this machine."""
