"""Explanations: where a digit model looks, digit by digit, and how far each picture can be trusted.

The package imports nothing itself (so that the floor module :mod:`digitlens.explain.maps`, which
the figures in :mod:`digitlens.plots` use, loads without the stage); import from its modules:

- :mod:`~digitlens.explain.run` (the stage): ``explain_run(run_dir)`` writes ``runs/NAME/explain/``;
  ``explain_model(model, images, labels)`` works on any nn.Module;
- :mod:`~digitlens.explain.methods`: ``attribute(model, images, target, method)``, one batch of
  per-image maps (Captum), and the Grad-CAM layer checks;
- :mod:`~digitlens.explain.aggregate`: ``PerDigitMaps(model, method).attribute(images, labels)``,
  the per-digit maps of one method;
- :mod:`~digitlens.explain.scoring`: ``faithfulness_report(model, images, targets, methods)``, the
  faithfulness verdict (ROAD from :mod:`~digitlens.explain.road`, deletion/insertion and the
  randomisation and random-logit checks from :mod:`~digitlens.explain.faithfulness`, the ranking
  from :mod:`~digitlens.explain.verdict`);
- :mod:`~digitlens.explain.figures`: the stage's figures;
- :mod:`~digitlens.explain.maps` (floor): map files, grouping and pooling.
"""
