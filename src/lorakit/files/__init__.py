"""Adapter files in PEFT's layout: PEFT's names and `adapter_config.json` (`peft_format.py`),
PEFT's matching rules (`peft_targets.py`), what a file's keys mean on a model (`file_keys.py`),
save / load (`adapter_file.py`); and the file rules every command shares: atomic writes
(`atomic.py`), JSON with located errors (`json_file.py`), a command's output folder
(`output_folder.py`)."""
