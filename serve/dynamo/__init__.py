"""fusionserve as an NVIDIA Dynamo backend worker (``fusionserve dynamo-worker``; ``make dynamo`` installs
ai-dynamo 1.6.1). Nothing outside this package imports it: ``fusionserve serve`` runs without Dynamo.

- ``inputs``: a Dynamo token request -> the prompt, media and sampling ``fusionserve serve`` would use
- ``kv_events``: our block manager's cache events -> KV events in the frontend's token space
- ``disagg``: prefill -> decode KV block transfer (torch.distributed, gloo)
- ``worker``: the ``LLMEngine`` over our ``AsyncEngine``
- ``launch``: one machine's frontend + N workers on loopback (``make dynamo-up``)
"""
