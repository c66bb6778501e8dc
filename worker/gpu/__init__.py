"""The GPU stage: the model, batched generation, claiming jobs and streaming tokens."""
