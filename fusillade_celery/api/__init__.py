"""The HTTP face: OpenAI's Files and Batches API over the same submit and store code as the
CLI and the Python helper, API keys, and a page for people (``fusillade-celery serve``)."""
