"""Flash sales (秒杀) for live streams: the hot path, measured against its ceiling (loadtests/)."""
