"""Corpus, tokenizer, frequency tiers, trainer and held-out evaluation."""
