"""The top-k all-reduce round: what moves between the members of a group, and how.

    averager.py     Averager: one member's side of a round (matchmaking, butterfly, commit), RoundFailed, NoGroup
    matchmaking.py  group formation through the DHT: declarations, started markers, make_plan, choose_leader
    entry_validation.py  SignedMatchmakingValidator: matchmaking DHT entries signed by the peer they name
    messages.py     the round's messages (Invite, GroupPlan, PartFrame, ResultFrame, CommitFrame) and their wire form
    round_state.py  RoundState: one member's state of one round (parts, results, commits, evidence)
    rounds.py       RoundConfig, RoundHooks, RoundReport, RoundOutcome, Phase
    robust.py       byzantine-robust span aggregation (centered_clip, trimmed_mean, median) and owners' result checks
    settle.py       what a member applies after a round and what goes back into its error feedback (pure)
    sparsify.py     top-k selection with error feedback (ErrorFeedbackSparsifier), check_density
    codecs.py       byte encodings of sparse updates (index and value codecs)
    quantize.py     int8 / int4 / int2 values with a scale per chunk (the integer value codecs codecs.py uses)
    rice.py         Golomb-Rice coded index gaps (the "rice" index codec, ~log2(e / density) bits per index)
    faults.py       fault injection for tests (Fault, mangle_part)
"""
