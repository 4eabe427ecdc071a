"""OpenAI-compatible HTTP gateway: /v1/chat/completions, /v1/completions and /v1/models over the NATS contract."""
