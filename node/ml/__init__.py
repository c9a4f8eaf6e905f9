"""Models and data (torch and transformers through their public APIs; no networking).

    models.py           architectures from configs (GPT-2, LLaMA, BERT, the bundled MiniLM, MLP, CNN), flat
                        parameters, memory estimates
    datasets.py         the bundled offline datasets, a node's private slice, ``swarmnode data``
    model_folder.py     a local Hugging Face model folder: its signed manifest, no remote code, no pickles
    job_model.py        the model a job trains, sized by its dataset; whether this node's data fits it
    stages.py           a model cut into stage modules by layer ranges; their costs
    attention_masks.py  the attention masks stages build themselves
    splitter.py         signed stage shards on disk, and a stage rebuilt from its shard; memory_aware_plan
"""
