"""The OpenAI-compatible HTTP gateway: ``/v1`` chat and text completions, files, fine-tuning jobs
and models over the Kafka topics and the PostgreSQL tables (docs/gateway.md).

Stateless: every gateway publishes to the shared request/training/control topics and reads the
results of its own requests from its own reply topic (``reply_to`` on each request).
"""
