"""The HTTP gateway: OpenAI-style best-of-n chat completions, the feedback log, a web page."""
