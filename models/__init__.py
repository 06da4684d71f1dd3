"""The heartbeat tokenizer and the torch scoring model, their artifacts and training."""
