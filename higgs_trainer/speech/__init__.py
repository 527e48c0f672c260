"""Speech samples from a LoRA adapter (stand-in until helper h20's package lands; its version wins on merge)."""
