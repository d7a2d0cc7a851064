"""OpenAI Responses (`POST /v1/responses`, `GET /v1/responses/{id}`): the wire models
(protocol.py), the pure translation to and from Chat Completions (translate.py) and the endpoints
(serving.py), which route the translated request through the chat path."""
