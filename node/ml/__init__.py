"""Models and data (torch and transformers through their public APIs; no networking).

    models.py           architectures from configs (GPT-2, LLaMA, BERT, the bundled MiniLM, MLP, CNN), flat
                        parameters, meta-device builds
    datasets.py         the bundled offline datasets, a node's private slice, ``swarmnode data``
    user_data.py        a node's own files (csv, parquet, jsonl, text, image folders) read in place and checked
                        against a job's declared schema
    model_folder.py     a local Hugging Face model folder: its signed manifest, no remote code, no pickles
    hf_models.py        a verified model folder built with transformers (+ a seeded LoRA adapter via peft), its
                        tokenizer, its export in peft's format
    job_model.py        the model a job trains, sized by its dataset; whether this node's data fits it
    stages.py           a model cut into stage modules by layer ranges; their costs
    attention_masks.py  the attention masks stages build themselves
    splitter.py         signed stage shards on disk, and a stage rebuilt from its shard; memory_aware_plan
    servable.py         a trained job's export (federated, adapter, pipeline shards) as a model folder to serve
    analyze.py          parameters, FLOPs and training memory per block (``swarmnode analyze``; the job memory check)
"""
