"""Scripts behind EXPERIMENTS.md's issue-18 entry: why the demo's encoders do not learn what the label probe asks.

- ``dump_features.py``: one run's eval features (the eval's own ``extract``), kept to probe them offline;
- ``probe_sweep.py``: the attentive probe per seed on those features, at the learning rates and epochs named;
- ``background_floor.py``: the pixel-reconstruction loss of predicting each clip's background colour;
- ``relation_data.py``: a two-class SSv2-layout set (closer to / away from) that no bag of tubelets can solve.
"""
