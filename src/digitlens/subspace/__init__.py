"""What LoRA adapters change in a model's weights: subspace similarity, amplification, spectra.

Three modules, lowest first:

- :mod:`digitlens.subspace.measures` (the computation floor): phi for every (i, j), chance levels,
  the Monte-Carlo nulls of phi and of the projection, amplification (the LoRA paper's Table 7),
  effective rank and intruder dimensions, on plain matrices.
- :mod:`digitlens.subspace.adapters`: PEFT LoRA adapters and base weights read from
  ``adapter_config.json`` + ``safetensors`` (PEFT is not imported).
- :mod:`digitlens.subspace.run` (the stage): ``analyse_adapters(base, [adapter dirs], out)`` for
  any PEFT LoRA adapter and ``analyse_run(run_dir, task)`` for a digitlens run's adapters, each
  writing one folder whole (``subspace.json``, ``summary.md``, ``figures/``, ``figures.json``).

The package imports nothing itself, so that the floor module (which ``digitlens.plots.subspace``
uses) loads without the stage: ``from digitlens.subspace.run import analyse_run``.
"""
