"""The Megatron-core driver: ES data selection in a Megatron-core training loop.

`checks` holds the input checks that run before any process group exists (they import no
Megatron); `model` builds a `GPTModel` with Megatron's DDP and optimizer from an es-llm model
preset; `step` holds the per-sample scoring forward, the ES-weighted train step through
`get_forward_backward_func`, the tensor-parallel lock-step check and the data path factory;
`export` writes the model as a Hugging Face directory; `train.train` is one whole run, the
entry point of `es-llm train --engine megatron`. See docs/megatron.md.
"""
