"""Engine drivers: they map the ES data path's four calls onto a training engine.

- ``es_llm.drivers.deepspeed``: the native DeepSpeed loop behind ``es-llm train``;
- ``es_llm.drivers.hf``: ``ESTrainer``, the Hugging Face ``Trainer`` adapter;
- ``scoring`` and ``losses``: the no-grad scoring forward and the weighted training loss
  both drivers share.
"""
