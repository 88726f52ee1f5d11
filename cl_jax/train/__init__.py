"""Training: the train state, the pure step, schedules, optimizers and the task loop.

`cl_jax/train/loop.py` holds the one task loop (`Plan`, `run_tasks`) every kind of run goes through, and the
classic kind's parts built on it; `state.build_state` and `step.compile_step` are how every kind builds its train
state and its jitted step. `cl_jax.run(config, workdir)` is the entry point for every kind.
"""
