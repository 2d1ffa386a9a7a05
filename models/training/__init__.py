"""Three-stage self-supervised training of the descriptor (the patent's recipe, round 2).

1. **Backbone** (:mod:`~models.training.backbone`): trunk, GeM and the 512-d reduction, with
   InfoNCE on asymmetric views of one image (a light gallery view at high res, a heavily edited
   query view at low or high res), a memory queue of negatives and a KoLeo entropy term. Generated
   everyday pictures (:mod:`models.synthetic`) join the photos as extra instances.
2. **Adapter 1** and 3. **adapter 2** (:mod:`~models.training.adapters`), backbone frozen, on the
   backbone's pooled features of ``cache_views`` augmented view triples per image, computed once
   (:mod:`~models.training.cache`).

Stage 1 checkpoints after each epoch (``out/checkpoints/backbone.pt``) and resumes from there;
stages 2 and 3 take minutes and save once when done; a finished stage is skipped on rerun
(:mod:`~models.training.checkpoints`). ``init_from`` warm-starts stage 1 from a model folder
(verified by its card's checksum).

The modules, in the order a run uses them:

* ``config``: :class:`TrainConfig` (typed, frozen, checked when built), :class:`Stage`,
  :class:`Adapter1Init`, :data:`RENAMED` (old setting names still read);
* ``data``: the training images and :class:`PairDataset`, the seeded view pairs, with its loader;
* ``checkpoints``: the ``checkpoints/`` folder (atomic, tensors only, old names read) and ``train_log.jsonl``;
* ``context``: :class:`RunContext`, what the stages of one run share;
* ``objective``: the LR schedule, the memory queue, the contrastive loss;
* ``initialisers``: :func:`whiten_init` (the 512-d head and adapter 1) and :func:`pca_init`;
* ``backbone``: stage 1; ``cache``: the feature cache; ``adapters``: stages 2 and 3;
* ``trainer``: :class:`Trainer` (the stages, the background bank, the card) and :func:`train`.

The command line (``modscan train --set KEY=VALUE``) is ``jobs/commands/train_cmd.py``.
"""

from models.training.config import RENAMED, Adapter1Init, Stage, TrainConfig
from models.training.data import PairDataset, list_images
from models.training.initialisers import pca_init, whiten_init
from models.training.trainer import Trainer, train

__all__ = ["RENAMED", "Adapter1Init", "PairDataset", "Stage", "TrainConfig", "Trainer", "list_images",
           "pca_init", "train", "whiten_init"]
