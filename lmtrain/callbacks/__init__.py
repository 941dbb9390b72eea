"""Lightning callbacks: checkpoint cadence, step metrics (throughput, MFU), progress lines."""
