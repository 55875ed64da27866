"""Engine core: requests, sequences, the paged-KV block manager, the scheduler and the engine loop."""
