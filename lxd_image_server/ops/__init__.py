"""The use cases an operator asks for: update, prune and remove, import, list, verify, push."""
