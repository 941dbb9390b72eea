"""Strategy builders, rank helpers and (later) sharding: applied from outside the model code."""
