"""OpenAI-compatible HTTP server (`loopcoder serve`) and interactive chat (`loopcoder chat`)."""
