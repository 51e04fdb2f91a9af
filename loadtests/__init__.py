"""Load tests and benchmarks: the Locust live-stream rush and the wrk benchmark of the flash-sale buy call."""
