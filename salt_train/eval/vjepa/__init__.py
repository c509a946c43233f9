"""`salt-train eval --protocol vjepa`: V-JEPA's frozen SSv2 evaluation, so a figure compares with published ones.

The wing's modules, in the order a clip goes through them:

- ``clips.py``: which videos (the train and validation splits the stores record, from the source download);
- ``views.py``: where a video's clips sit in time (16 frames, step 4, 2 clips) and the 3 spatial views of
  validation, and how clips and views are laid out for the encoder and the probe;
- ``augment.py``: the training augmentation (RandAugment, random resized crop, random erasing), seeded;
- ``data.py``: decoding workers, the epoch's global batches cut into ranks and micro-batches;
- ``probe.py``: the attentive probe over both clips' tokens, and the view-averaged softmax;
- ``optim.py``: AdamW with V-JEPA's weight-decay groups, the cosine schedules, gradient accumulation;
- ``command.py``: the loop, the figures and ``eval.json``.
"""
