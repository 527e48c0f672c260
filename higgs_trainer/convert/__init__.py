"""``higgs-trainer convert``: convert adapters and models between boson_multimodal's and transformers' Higgs layouts."""
