"""The wrapping layers and how they compute y = base(x) + s * B A x: the plain reference
(`base.py`), the layer kinds (`plain.py`, `quantized.py`), the one choice of path
(`dispatch.py`) and the fast kernels it may pick (`fused.py`, `dora.py`, `quantized_fused.py`),
mixed-adapter batches (`mixed.py`), and torch's private API behind checks (`torch_internals.py`)."""
