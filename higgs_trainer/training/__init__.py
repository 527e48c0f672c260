"""Training time: the trainer and its mixin, finding the PEFT component, saving, gathering sharded adapters, resuming."""
