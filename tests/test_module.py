import pytest
import torch
import torch.nn.functional as F

from seq2seq import compose
from seq2seq.data import IGNORE_INDEX, Batch
from seq2seq.module import sequence_loss
from seq2seq.testing import BOS, EOS, random_batch, tiny_model


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_sequence_loss_equals_cross_entropy_over_all_positions_ignoring_padding(smoothing):
    model = tiny_model()
    src, src_keep, tgt, tgt_keep = random_batch()
    tgt_in = torch.cat([torch.full((4, 1), BOS), tgt[:, :-1]], dim=1).masked_fill(~tgt_keep, 0)
    tgt_out = tgt.masked_fill(~tgt_keep, IGNORE_INDEX)
    tgt_out[0, -1] = EOS
    logits = model(src, src_keep, tgt_in, tgt_keep)  # (B, T, V)
    expected = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=IGNORE_INDEX,
                               label_smoothing=smoothing)
    got = sequence_loss(model, Batch(src, src_keep, tgt_in, tgt_out), smoothing)
    torch.testing.assert_close(got, expected)


def test_a_checkpoint_config_loads_on_a_machine_unlike_the_one_that_trained_it():
    from seq2seq.config import load_train_config
    from seq2seq.schema import to_data

    data = to_data(compose(["experiment=reverse"]))
    data["trainer"]["precision"] = "16-mixed"  # trained on a GPU; loaded here, on the CPU
    data["loggers"] = ["csv", "tensorboard"]
    assert load_train_config(data).trainer.precision == "16-mixed"
