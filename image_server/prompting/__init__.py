"""The prompt policy: what to do with a prompt longer than a provider takes (refuse, compress
it with a local LLM through Ollama, or truncate it at a word boundary)."""
