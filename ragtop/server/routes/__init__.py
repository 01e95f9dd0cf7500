"""HTTP routes: thin; each parses its body, asks the serving object, and shapes the reply."""
