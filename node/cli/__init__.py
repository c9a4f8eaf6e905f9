"""The ``swarmnode`` command (``python -m node.cli``, or the ``swarmnode`` script).

    main.py      the argument parser and the dispatch; every expected failure one line, exit 1 or 2
    commands.py  run, status/peers/leave, submit/jobs/job/cancel, data, split
    dev.py       dev-swarm and the demo job that ``make demo`` runs
    analyze.py   ``swarmnode analyze``: parameters, FLOPs and training memory of a model (node/ml/analyze.py)
    swarm.py     ``swarmnode swarm``: a private swarm's owner key and membership certificates
    serve.py     ``swarmnode serve``, ``generate``, ``embed``: serve a model across the swarm, ask its endpoint
    format.py    tables and progress lines for people (``--json`` prints node/api/serde.py's dicts instead)
    progress.py  the live bar with the time left that ``--follow`` draws on a terminal (rich)
"""
