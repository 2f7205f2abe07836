"""Secure aggregation (SecAgg+) of merge statistics: ring encoding, Shamir shares, key agreement and masks,
the neighbour graph, and the protocol's two sides."""
