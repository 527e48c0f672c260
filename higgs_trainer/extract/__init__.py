"""``higgs-trainer extract``: rescue a LoRA adapter from a full checkpoint written without one."""
