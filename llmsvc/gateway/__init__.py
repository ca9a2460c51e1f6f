"""The HTTP side: OpenAI wire format in, journal, provider, SSE out."""
