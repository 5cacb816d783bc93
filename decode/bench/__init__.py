"""The decoding benchmark, one job per module:

    cli.py      `python -m decode.bench`: the sweep, its console lines and its JSON
    models.py   the model under test, its exit-layer variants, its prompts, one decode of them
    timing.py   AR vs SSD at one sweep point: interleaved timing, speed and acceptance reports
    cost.py     the cost model: timed primitives, an engine round, the ideal speedup
    replay.py   teacher-forced replay of AR output: acceptance by context length
    machine.py  what a result was measured on
    plots.py    PNGs of result JSONs (`python -m decode.bench.plots RESULT.json ...`)
    peers.py    ours vs Hugging Face transformers on the same weights
                (`python -m decode.bench.peers`; needs torch, imported only when run)

Nothing here is imported by the engine, the captioner or training.
"""
