"""``higgs-trainer merge``: merge an adapter into its base model, streamed tensor by tensor or in memory."""
