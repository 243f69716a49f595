"""Needle's web side: schema, queries and the FastAPI server. Never imports torch or transformers."""
