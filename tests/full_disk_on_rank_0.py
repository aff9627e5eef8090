"""``python -m fmnist_keras.train`` whose rank 0 finds the disk full at its third epoch's end; run by
``tests/test_distributed.py``.

Rank 0 alone writes the run, so a full disk stops rank 0 alone: the other ranks must not wait for it in
a collective. Keras's ``BackupAndRestore`` saves the weights once per epoch, and from its third save on
rank 0's ``save_weights`` fails as a full disk does.

Usage: python tests/full_disk_on_rank_0.py TRAIN_ARGUMENTS...  (each rank with WORLD_SIZE, RANK, ...,
as torchrun sets them)
"""

import errno
import os
import runpy
import sys

from fmnist_keras.backend import select_backend

select_backend("torch")

import keras  # noqa: E402

_save_weights = keras.Model.save_weights
_saves = 0


def _save_weights_until_the_disk_is_full(self, filepath, *args, **kwargs):
    global _saves
    _saves += 1
    if os.environ["RANK"] == "0" and _saves >= 3:
        raise OSError(errno.ENOSPC, "No space left on device", str(filepath))
    return _save_weights(self, filepath, *args, **kwargs)


keras.Model.save_weights = _save_weights_until_the_disk_is_full
sys.argv = ["fmnist_keras.train", *sys.argv[1:]]
runpy.run_module("fmnist_keras.train", run_name="__main__", alter_sys=True)
