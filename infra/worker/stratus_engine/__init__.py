"""The inference engine the workers run: a model directory, continuous batching, sampling."""
