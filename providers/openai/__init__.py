"""An OpenAI-compatible upstream: the passthrough provider (issue 16)."""
