"""A run's data: reading files and tokenising examples (`examples.py`), chat conversations
(`chat.py`), packing (`packing.py`) and what `lorakit data` reports (`summary.py`)."""
