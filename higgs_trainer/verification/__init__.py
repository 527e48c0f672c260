"""Checking adapters by their content: config, tensors, modules against a base, adapters that never trained."""
