"""Adapters on the user's model: the public functions (`manage.py`: inject, add, set, merge,
unload...), what is kept on the model (`registry.py`), adding an adapter as a transaction
(`plan.py`, with the given tensors checked in `given.py`), mixed-adapter batches (`mixed.py`),
PiSSA's residual base (`pissa.py`; how A and B start is `layers/init_schemes.py`), trained module
copies (`saved_modules.py`) and new tokens' rows (`token_rows.py`). The tree rules they read the
model by are `lorakit/module_tree.py`."""
