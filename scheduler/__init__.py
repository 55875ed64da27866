"""Engine core: requests, sequences, paged-KV block manager, scheduler and engine loop."""
