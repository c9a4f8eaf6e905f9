"""Serving a model (issue 19): stage hosts answer inference requests, a client routes them, and an HTTP endpoint in
OpenAI's API shape runs them.

    host.py      InferenceHost: one replica of one stage of a served model (eval mode, bounded and expiring key/value
                 caches per session), announced in the DHT like a training stage
    client.py    InferenceClient: one replica per stage, generation token by token (replay on another replica
                 when a host dies), embeddings; ServedModel, ClientConfig
    backend.py   SwarmBackend: a served model as the HTTP API's Backend
    local.py     Backend (what the API runs a model through: embed, generate) and LocalBackend (a whole
                 transformers model in this process, generating with its own KV cache)
    http_api.py  start_http: the OpenAI-compatible aiohttp app (/v1/models, /v1/embeddings, /v1/completions), its
                 token off loopback, Limits and OpenAI-shaped one-line errors
    batching.py  EmbedBatcher (embedding inputs of concurrent requests merged into one backend call) and
                 RequestGate (at most N requests served, a bounded queue, 429 beyond it)
    text.py      TextCodec: ByteText (the byte-level LMs' vocabulary) and HFText (a tokenizer from a local folder)
"""
