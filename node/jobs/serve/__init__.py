"""Served models (kind = "serve"): a model's stages hosted by other nodes for inference, the endpoint on the node
that submitted it (the hosts, the client and the endpoint themselves are node/serving/'s).

    serve_jobs.py  ServeJobs: check and place a served model (as a pipeline job is placed), host an assigned stage,
                   run the submitter's HTTP endpoint and keep the hosts up to date with the live peers
"""
