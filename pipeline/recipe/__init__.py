"""The recipe: what a researcher changes to train differently, each concern in one module.

- :mod:`~pipeline.recipe.models`: the architectures, by name (``model.name``);
- :mod:`~pipeline.recipe.augment`: the training augmentations and test-time augmentation, side by side;
- :mod:`~pipeline.recipe.sampling`: seeded per-epoch streams, global batches and each process's shard;
- :mod:`~pipeline.recipe.optim`: the optimizer, the learning-rate schedule and the moving average of the weights;
- :mod:`~pipeline.recipe.step`: the one training step, which the train stage and the benchmarks all run.

The machinery around it (processes, checkpoints, tracking, the stages) lives one level up, in ``pipeline/``.
"""
