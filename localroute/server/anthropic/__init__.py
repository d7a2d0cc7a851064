"""Anthropic Messages (`POST /v1/messages`, `POST /v1/messages/count_tokens`): the wire models
(protocol.py), the pure translation to and from Chat Completions (translate.py) and the endpoints
(serving.py), which route the translated request through the chat path."""
