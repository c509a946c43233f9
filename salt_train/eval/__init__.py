"""`salt-train eval` and the quick evaluation during training: the evaluation's own wing.

- :mod:`~salt_train.eval.command`: the command (which models, which rows, the sections);
- :mod:`~salt_train.eval.features`: frozen features, computed once per model and row set;
- :mod:`~salt_train.eval.pixels`: the encoder-free feature, the floor every probe row shows;
- :mod:`~salt_train.eval.probes`: attentive, linear and retrieval probes;
- :mod:`~salt_train.eval.temporal`: the label-free temporal probes' clip transforms;
- :mod:`~salt_train.eval.stats`: intervals (bootstrap over rows) and seed means;
- :mod:`~salt_train.eval.report`: the table, eval.json, eval.png;
- :mod:`~salt_train.eval.quick`: held-out loss and R^2 every ``train.eval_every`` steps.

Training imports nothing from here except through the evaluation callable it is handed.
"""
