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

Everything public is re-exported here: ``from digitlens.subspace import analyse_run, phi``.
(``digitlens.plots.subspace`` imports only the floor, ``digitlens.subspace.measures``; importing
it first runs this file, whose stage imports ``digitlens.plots.subspace`` back as a module object
(``from digitlens.plots import subspace``), so either import order works.)
"""

from digitlens.subspace.adapters import (LoraAdapter, LoraModule, load_base_weights, match_base_weight,
                                         read_lora_adapter)
from digitlens.subspace.measures import (ALPHA, NULL_DRAWS, PAPER_TABLE7_WQ, PROJECTION_DRAWS, amplification,
                                         chance_corrected, chance_phi, effective_rank, intruder_dimensions,
                                         monte_carlo_p, phi, phi_matrix, phi_significance, phi_summary,
                                         projection_null, random_orthonormal, random_phi_null,
                                         right_singular_vectors, svd)
from digitlens.subspace.run import (SUBSPACE_JSON_KEYS, aggregate_phi, amplification_markdown,
                                    amplification_over_seeds, analyse_adapters, analyse_run, summary_markdown)

__all__ = [
    "ALPHA", "LoraAdapter", "LoraModule", "NULL_DRAWS", "PAPER_TABLE7_WQ", "PROJECTION_DRAWS", "SUBSPACE_JSON_KEYS",
    "aggregate_phi", "amplification", "amplification_markdown", "amplification_over_seeds", "analyse_adapters",
    "analyse_run", "chance_corrected", "chance_phi", "effective_rank", "intruder_dimensions", "load_base_weights",
    "match_base_weight", "monte_carlo_p", "phi", "phi_matrix", "phi_significance", "phi_summary", "projection_null",
    "random_orthonormal", "random_phi_null", "read_lora_adapter", "right_singular_vectors", "summary_markdown", "svd",
]
