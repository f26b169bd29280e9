"""profiling package."""
