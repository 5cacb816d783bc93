"""One-off recipes and tools built on the training library (train.run and its parts).

    python -m train.recipes.demo               # trains the offline `demo` checkpoint, all stages
    python -m train.recipes.demo_eagle         # trains the demo's EAGLE head and records its cost
    python -m train.recipes.make_draft_model   # a separate draft model: a checkpoint's first N layers
    python -m train.recipes.draft_agreement    # a draft model's top-1 agreement with its target

The library itself (train.config, train.run, train.step, ...) does not import them.
"""
