"""Adapters on the user's model: the public functions (`manage.py`: inject, add, set, merge,
unload...), what is kept on the model (`registry.py`), adding an adapter as a transaction
(`plan.py`), the module tree (`module_tree.py`), how A and B start (`init_schemes.py`, PiSSA's
residual base in `pissa.py`), trained module copies (`saved_modules.py`) and new tokens' rows
(`token_rows.py`)."""
