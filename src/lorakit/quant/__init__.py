"""Quantized bases (QLoRA): bitsandbytes' layers as lorakit knows them (`bnb.py`), a model's
linear layers to NF4 / FP4 / int8 and back (`convert.py`), LoftQ's start (`loftq.py`).
bitsandbytes stays optional: it is imported inside the functions that need it."""
