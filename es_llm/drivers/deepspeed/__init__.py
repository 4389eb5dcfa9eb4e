"""The native DeepSpeed driver: the loop behind `es-llm train`, its checkpoints, config and metrics."""
