"""Text in and out: tokenizer loading and prompt encoding, incremental detokenizer, terminal chat."""
