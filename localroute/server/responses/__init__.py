"""OpenAI Responses (`POST /v1/responses`, `GET /v1/responses/{id}`): the wire models
(protocol.py), the pure translations of requests to Chat Completions (translate_request.py) and of
answers back (translate_answer.py), and the endpoints (serving.py), which route the translated
request through the chat path."""
