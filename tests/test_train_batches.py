"""The training loop's batch path: Ray Data fetches of many batches, cut into training batches.

A real Ray Data dataset on a private local Ray; the loop's `batches` over its iterator, as a
Ray Train worker calls it (ray.train.get_dataset_shard returns the same DataIterator type).
"""

import numpy as np
import pytest
import torch

from pipelines.data.video.schema import CAPTION, LABEL
from pipelines.training.data import LatentCollate
from pipelines.training.loop import Means, batches

ROWS, BATCH, FETCH = 50, 4, 12  # fetches of 3 batches; each epoch ends on a fetch of 2 rows (dropped)


@pytest.fixture(scope="module")
def dataset():
    import ray

    # An earlier module may have left this process connected to a test head; Ray Data runs there as well.
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    rows = [{"content": np.full((2, 3), i, np.float32), CAPTION: f"clip {i}", LABEL: i % 5} for i in range(ROWS)]
    yield ray.data.from_items(rows, override_num_blocks=5)
    if started:
        ray.shutdown()


def test_batches_cover_each_epoch_once_in_whole_shuffled_batches(dataset):
    per_epoch = ROWS // BATCH  # as drop_last on training batches: every rank takes the same steps
    stream = batches(dataset.iterator(), BATCH, LatentCollate(), torch.device("cpu"), seed=0, rows_per_fetch=FETCH)
    epochs = []
    for _ in range(2):
        seen = []
        for _ in range(per_epoch):
            batch = next(stream)
            assert batch["content"].shape == (BATCH, 2, 3) and batch["content"].dtype == torch.float32
            ids = batch["content"][:, 0, 0].long().tolist()
            assert batch[CAPTION] == [f"clip {i}" for i in ids]  # captions stay with their rows through the cut
            assert batch[LABEL].dtype == torch.long and batch[LABEL].tolist() == [i % 5 for i in ids]
            seen += ids
        assert len(set(seen)) == len(seen) == per_epoch * BATCH  # no row twice in an epoch
        epochs.append(seen)
    assert epochs[0] != epochs[1] and epochs[0] != sorted(epochs[0])  # shuffled, differently each epoch


def test_one_batch_per_fetch_when_the_stage_asks_for_it(dataset):
    stream = batches(dataset.iterator(), BATCH, LatentCollate(), torch.device("cpu"), seed=0, rows_per_fetch=0)
    assert all(next(stream)["content"].shape[0] == BATCH for _ in range(2 * (ROWS // BATCH)))


def test_means_read_once_and_start_over():
    means = Means()
    for value in (1.0, 2.0, 6.0):
        means.add(loss=torch.tensor(value), grad_norm=torch.tensor(2 * value))
    assert means.read() == pytest.approx({"loss": 3.0, "grad_norm": 6.0})
    means.add(loss=torch.tensor(5.0))
    assert means.read() == {"loss": 5.0}
