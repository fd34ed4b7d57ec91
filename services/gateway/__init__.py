"""The OpenAI-compatible gateway (see ``service``)."""
