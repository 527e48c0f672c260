"""Files and directories: atomic writes, runs and checkpoints, adapter files, safetensors, full checkpoints, pickles."""
